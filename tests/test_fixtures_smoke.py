from cifar_tl.inference import Predictor


def test_model_dirs_predict(cnn_model_dir, timm_model_dir, cifar100_arrays):
    images = list(cifar100_arrays["test"][0][:3])
    for d in (cnn_model_dir, timm_model_dir):
        out = Predictor.from_dir(d).predict(images, top_k=5)
        assert len(out) == 3 and len(out[0]["fine"]) == 5 and out[0]["coarse"]["label"]
