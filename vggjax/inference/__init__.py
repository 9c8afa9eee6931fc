"""Running a trained classifier: the classifier-directory format and the logits -> probabilities
rule (`classifier`), classifying image files (`predictor`), and the serving function that
`vggjax.export` ships (`serving`)."""
