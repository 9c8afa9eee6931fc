"""Running a trained classifier: the classifier-directory format and the logits -> probabilities
rule (`classifier`), classifying image files (`predictor`), reading exported artifacts
(`artifact`), the serving function that `vggjax.export` ships (`serving`), and classifiers
trained in Keras or PyTorch written in that format (`imported`).

    clf = vggjax.inference.load_classifier("WORKDIR/classifiers/finetune")   # a phase's classifier
    probs = vggjax.inference.predict(clf, images)          # (N, 150, 150, 3) uint8 -> (N, 2)
"""
from vggjax.inference.classifier import TrainedClassifier, load_classifier, predict
from vggjax.inference.predictor import Predictor, load_predictor, predict_files
