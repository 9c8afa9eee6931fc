"""The book's transfer learning: input pipelines, augmentation, freezing, the training loop, data
parallelism, checkpoints, the feature cache, the workflow (`config`, `workflow`) and its report.

    vggjax.train.make_train_step(model, tx), vggjax.train.fit(state, ...), vggjax.train.TrainState
"""
from vggjax.train.loop import evaluate, fit
from vggjax.train.steps import TrainState, make_eval_step, make_train_step
