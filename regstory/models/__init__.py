"""Architectures (registry): ``regstory.models.create("resnet32", input_shape=(3, 32, 32), num_classes=10)``."""
from regstory.models import lenet, mlp, resnet_cifar, torchvision_models, vgg  # noqa: F401  (register built-ins)
from regstory.models import simple_convnet  # noqa: F401  (debiasing backbones)
from regstory.models import vit  # noqa: F401  (ViTs with adapter sites)
from regstory.models.base import MODELS, Classifier, count_parameters, register_model


def create(name: str, input_shape, num_classes: int, **kwargs) -> Classifier:
    return MODELS.get(name)(input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)


__all__ = ["MODELS", "Classifier", "count_parameters", "create", "register_model"]
