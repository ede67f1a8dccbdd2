"""cifar-tl: CIFAR-100 classification from dataset to trained weights, Hub model and Gradio demo."""
__version__ = "0.1.0"


def from_pretrained(model_dir_or_hub_id: str, device=None):
    """A ready Predictor (model + preprocessing + label names) from a model folder or a Hub id."""
    from .loading import load_predictor

    return load_predictor(model_dir_or_hub_id, device=device, named=f"from_pretrained({str(model_dir_or_hub_id)!r})")
