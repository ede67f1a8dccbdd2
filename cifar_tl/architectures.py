"""cifar-tl's own CNNs, registered as timm models: importing this module makes `timm.create_model("baseline_cnn")`
(and `timm.create_model("local-dir:DIR")` / `"hf-hub:..."` on one of our exported folders) work like any timm
architecture, with a `pretrained_cfg` that carries CIFAR's input size and normalisation.

* `baseline_cnn`: the reference study's Keras CNN as it was built: 3 stacks of Conv-Conv-MaxPool-Dropout, no
  BatchNorm, Flatten + two hidden Dense layers + the 100-way Dense softmax (the study's "9-layer" network; a fixed
  32x32 input).
* `baseline_cnn_bn` (`_small`, `_wide`): our modernised relative: BatchNorm after every conv, global average
  pooling and one linear layer (folders written before format 2 call it `baseline_cnn`).
* `fast_cnn` (`_wide`): airbench94's network (Jordan, 2024), the CPU time-to-accuracy pick; `fast_cnn_96`:
  airbench96's (wider, a third conv and a residual connection per stack).

None of them has pretrained weights (`pretrained_cfg` has no source): they train from scratch."""
from __future__ import annotations

from collections import OrderedDict

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)


class _CifarCNN(nn.Module):
    """timm's model API (`num_features`, `forward_features`, `forward_head`, `get_classifier`,
    `reset_classifier`) over features -> global_pool -> head_drop -> classifier, shared by our own CNNs.
    `build_model_with_cfg` sets `pretrained_cfg`."""

    def _init_head(self, features: nn.Sequential, num_features: int, num_classes: int, global_pool: nn.Module,
                   head_drop: nn.Module) -> None:
        self.features = features
        self.num_features, self.num_classes = num_features, num_classes
        self.global_pool, self.head_drop = global_pool, head_drop
        self.classifier = self._new_classifier(num_classes)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = self._new_classifier(num_classes)


class BaselineCNN(_CifarCNN):
    """Our relative of the study's CNN (`baseline_cnn_bn*`): 3 stacks of Conv-Conv-MaxPool(2, stride 2)-
    Dropout(drop_rate) with same padding and ReLU, filters doubling with depth, then global average pooling and
    a linear classifier. BatchNorm after each conv lets it train at a high learning rate; `batchnorm=False` is
    kept for folders that recorded it."""

    def __init__(self, num_classes: int = 100, widths: tuple[int, ...] = (64, 128, 256),
                 drop_rate: float = 0.25, batchnorm: bool = True, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_chans
        for w in widths:
            for c in (c_in, w):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=not batchnorm)]
                layers += [nn.BatchNorm2d(w)] if batchnorm else []
                layers += [nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2, 2), nn.Dropout(drop_rate)]
            c_in = w
        self._init_head(nn.Sequential(*layers), c_in, num_classes, nn.AdaptiveAvgPool2d(1), nn.Identity())
        self.model_args = {"widths": list(widths), "drop_rate": drop_rate, "batchnorm": batchnorm}


class _Conv2D(nn.Conv2d):
    """Keras `Conv2D(filters, 3, padding="same", activation="relu")`: the activation is part of the layer, so a
    model summary lists the layers Keras lists."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1)  # "same" for a 3x3 kernel at stride 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class _Dense(nn.Linear):
    """Keras `Dense(units, activation="relu")`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class _Flatten(nn.Module):
    """Keras `Flatten` of a channels-last feature map: (h, w, c) order, so the first Dense kernel of a Keras model
    ports by a transpose alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


class StudyCNN(_CifarCNN):
    """The reference study's "9-layer Fully Connected CNN" (Keras), layer for layer (`baseline_cnn`): 3 stacks of
    Conv2D-Conv2D-MaxPool2D(2, stride 2)-Dropout with same padding and ReLU, then Flatten, two hidden Dense
    layers with Dropout and the Dense output (its softmax is in the loss and in the predictors). No BatchNorm.
    The modules carry Keras' default layer names (features.conv2d, conv2d_1, max_pooling2d, dropout, ...;
    flatten; head.dense, dropout_3, dense_1, dropout_4; the output layer, Keras' dense_2, is `classifier` as in
    timm). The Flatten fixes the input size.

    Where the study is silent (it gives the layer types and counts, not their sizes), the defaults are: filters
    32-64-128 (doubling per stack), hidden Dense 512 and 256, Dropout 0.2 / 0.3 / 0.4 after the stacks and
    `drop_rate` (0.5 in the preset) after each hidden Dense: 1,493,124 parameters for 100 classes."""

    def __init__(self, num_classes: int = 100, widths: tuple[int, ...] = (32, 64, 128),
                 dense: tuple[int, ...] = (512, 256), conv_drop_rates: tuple[float, ...] = (0.2, 0.3, 0.4),
                 drop_rate: float = 0.5, in_chans: int = 3, img_size: int | tuple[int, int] = 32,
                 batchnorm: bool = False):
        if batchnorm:  # a folder written before format 2, when baseline_cnn was today's baseline_cnn_bn
            raise ValueError("baseline_cnn is the study's CNN without BatchNorm since cifar-tl model-folder format "
                             "2; batchnorm: true describes what is now baseline_cnn_bn: load the folder with "
                             "cifar_tl (model_folder.load_model maps the old name)")
        super().__init__()
        count: dict[str, int] = {}

        def keras_name(kind: str) -> str:  # Keras' default names: conv2d, conv2d_1, ...
            count[kind] = count.get(kind, -1) + 1
            return kind if count[kind] == 0 else f"{kind}_{count[kind]}"

        layers, c_in = OrderedDict(), in_chans
        for width, rate in zip(widths, conv_drop_rates, strict=True):
            layers[keras_name("conv2d")] = _Conv2D(c_in, width)
            layers[keras_name("conv2d")] = _Conv2D(width, width)
            layers[keras_name("max_pooling2d")] = nn.MaxPool2d(2, stride=2)
            layers[keras_name("dropout")] = nn.Dropout(rate)
            c_in = width
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        n_in, head = c_in * (height >> len(widths)) * (width >> len(widths)), OrderedDict()
        for units in dense:
            head[keras_name("dense")] = _Dense(n_in, units)
            head[keras_name("dropout")] = nn.Dropout(drop_rate)
            n_in = units
        self.features, self.flatten, self.head = nn.Sequential(layers), _Flatten(), nn.Sequential(head)
        self.num_features, self.num_classes = n_in, num_classes
        self.classifier = self._new_classifier(num_classes)
        self.model_args = {"widths": list(widths), "dense": list(dense), "conv_drop_rates": list(conv_drop_rates),
                           "drop_rate": drop_rate}

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head(self.flatten(x))
        return x if pre_logits else self.classifier(x)


class _DiracConv(nn.Conv2d):
    """3x3 'same' conv whose first `in_channels` filters start as the identity: an implicit residual
    path that lets a plain (non-residual) stack train fast."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[:self.in_channels])


class _ScaledLinear(nn.Linear):
    """Bias-free classifier with fixed output scaling (keeps the initial logits small)."""

    def __init__(self, c_in: int, num_classes: int, scale: float = 1 / 9):
        super().__init__(c_in, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class _ResidualPair(nn.Module):
    """airbench96's block tail: Conv-BN-GELU-Conv-BN plus the block's input (the GELU follows outside)."""

    def __init__(self, width: int, norm):
        super().__init__()
        self.body = nn.Sequential(_DiracConv(width, width), norm(width), nn.GELU(), _DiracConv(width, width),
                                  norm(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FastCNN(_CifarCNN):
    """airbench94's network (Jordan, 2024: 94 % CIFAR-10 in 10 epochs): a frozen 2x2 whitening conv
    initialised from the data's patch covariance, then 3 stacks of Conv-MaxPool-BN-GELU-Conv-BN-GELU
    (BatchNorm without scale weights, dirac-initialised convs), global max pooling and a scaled linear head.
    `depth=3` is airbench96's stack: Conv-MaxPool-BN-GELU, then Conv-BN-GELU-Conv-BN with a residual connection
    over those two convs, then GELU. Call `init_whitening(images)` on normalised training images before training
    from scratch."""

    def __init__(self, num_classes: int = 100, widths: tuple[int, ...] = (32, 128, 128), in_chans: int = 3,
                 whiten_kernel: int = 2, drop_rate: float = 0.0, depth: int = 2):
        super().__init__()
        if depth not in (2, 3):
            raise ValueError(f"FastCNN depth is 2 (airbench94) or 3 (airbench96); got {depth}")
        c_in = 2 * in_chans * whiten_kernel ** 2  # each whitening direction and its negative
        layers: list[nn.Module] = [nn.Conv2d(in_chans, c_in, whiten_kernel), nn.GELU()]
        layers[0].weight.requires_grad_(False)  # set from the data, never trained
        for w in widths:
            layers += [_DiracConv(c_in, w), nn.MaxPool2d(2), self._norm(w), nn.GELU()]
            layers += ([_DiracConv(w, w), self._norm(w), nn.GELU()] if depth == 2
                       else [_ResidualPair(w, self._norm), nn.GELU()])
            c_in = w
        self._init_head(nn.Sequential(*layers), c_in, num_classes, nn.AdaptiveMaxPool2d(1), nn.Dropout(drop_rate))
        self.model_args = {"widths": list(widths), "whiten_kernel": whiten_kernel, "drop_rate": drop_rate}
        if depth != 2:  # depth-2 folders keep the config they always had
            self.model_args["depth"] = depth

    def _new_classifier(self, num_classes: int) -> nn.Module:
        return _ScaledLinear(self.num_features, num_classes)

    @property
    def whitening_bias(self) -> nn.Parameter:
        """The whitening stem's bias: the stem's only trainable part (airbench trains it for the first epochs)."""
        return self.features[0].bias

    @staticmethod
    def _norm(width: int) -> nn.BatchNorm2d:
        norm = nn.BatchNorm2d(width, eps=1e-12, momentum=0.4)  # fast-moving statistics for short runs
        norm.weight.requires_grad_(False)
        return norm

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to the ZCA-style whitening of the images' k x k patches (eigenvectors scaled by
        1/sqrt(eigenvalue), plus their negatives so the GELU keeps both signs)."""
        conv = self.features[0]
        c, k = conv.in_channels, conv.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c * k * k)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0).reshape(-1, c, k, k)
        conv.weight.copy_(torch.cat((filters, -filters)))
        conv.bias.zero_()


# --------------------------------------------------------------------------------------------- registry

# name -> (class, default constructor arguments); the names are timm model names once registered below
VARIANTS: dict[str, tuple[type[_CifarCNN], dict]] = {
    "baseline_cnn": (StudyCNN, {}),  # the study's network: configs/baseline_cnn.yaml
    "baseline_cnn_bn": (BaselineCNN, {"widths": (64, 128, 256)}),  # ours: BatchNorm + global pooling
    "baseline_cnn_bn_small": (BaselineCNN, {"widths": (32, 64, 128)}),  # 4x cheaper, for CPU time budgets
    "baseline_cnn_bn_wide": (BaselineCNN, {"widths": (128, 256, 512)}),
    "fast_cnn": (FastCNN, {"widths": (32, 128, 128)}),  # airbench94 at half width: the 2-core CPU pick
    "fast_cnn_wide": (FastCNN, {"widths": (64, 256, 256)}),  # airbench94's own widths
    "fast_cnn_96": (FastCNN, {"widths": (128, 384, 512), "depth": 3}),  # airbench96's network
}


def _cfg(cls: type[_CifarCNN]) -> dict:
    # no `hf_hub_id` / `url`: these architectures have no pretrained weights
    fixed = cls is StudyCNN  # Flatten + Dense: the input size is part of the architecture
    return {"num_classes": 100, "input_size": (3, 32, 32), "pool_size": None, "crop_pct": 1.0,
            "crop_mode": "center", "interpolation": "bilinear", "mean": CIFAR_MEAN, "std": CIFAR_STD,
            "first_conv": "features.conv2d" if fixed else "features.0", "classifier": "classifier",
            "fixed_input_size": fixed, "license": "apache-2.0"}


default_cfgs = generate_default_cfgs({name: _cfg(cls) for name, (cls, _) in VARIANTS.items()})


def _entrypoint(name: str):
    """The timm entry point `name(pretrained=False, **kwargs)`; kwargs override the variant's defaults."""
    cls, defaults = VARIANTS[name]

    def build(pretrained: bool = False, **kwargs) -> _CifarCNN:
        model = build_model_with_cfg(cls, name, pretrained, **{**defaults, **kwargs})
        model.pretrained_cfg["architecture"] = name
        return model

    build.__name__ = build.__qualname__ = name  # timm registers an entry point under its function name
    return build


for _name in VARIANTS:
    globals()[_name] = register_model(_entrypoint(_name))


def is_own(name: str) -> bool:
    """Whether `name` is one of cifar-tl's architectures (built by this package, not by timm alone)."""
    return name in VARIANTS
