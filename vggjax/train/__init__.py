"""The book's transfer learning: input pipelines, augmentation, freezing, the training loop, data parallelism, checkpoints, the feature cache, the classifier, the workflow and its report."""
