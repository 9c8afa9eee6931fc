"""The network: the VGG module (`vgg`), its 3x3 convs (`winograd`: dispatch, XLA direct and Winograd; `onednn`: the oneDNN custom call) and the Keras-style `summary`."""
