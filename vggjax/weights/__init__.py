"""Pretrained weights: reading the published Keras/torchvision/timm files (`keras`, `torch`) and
whole Keras models (`keras_model`; their layer graph: `keras_graph`), fetching them (`download`;
timm's from the Hugging Face Hub: `hub`), what a complete set looks like (`spec`), and the converted
weights directory users load (`store`: `load`, `convert_file`, `save`, `Pretrained`),
`torch.save` files read without torch or running their pickles (`torch_pickle`), and seeded random
weights for tests and smoke runs (`random_weights`)."""
from vggjax.weights.store import (METADATA, SOURCES, Pretrained, convert_file, default_output_dir,
                                  load, save)
