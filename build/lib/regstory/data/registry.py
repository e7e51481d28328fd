"""The dataset registry: ``regstory.data.DATASETS.get(name)(root=..., download=..., **options)``."""
from regstory.registry import Registry

DATASETS: Registry = Registry("dataset")
register_dataset = DATASETS.register
