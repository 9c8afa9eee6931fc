"""Models trained elsewhere as vggjax classifiers: whole Keras models saved by Keras' own
model.save (the book's two editions and the other structures it allows) and a fine-tuned
torchvision VGG saved by torch.save predict what Keras / PyTorch predict on JPEG photos, and
anything else is refused in one line naming the layer."""
import json
import zipfile

import numpy as np
import pytest

from helpers import CAFFE_INPUT_RMS, assert_parity, random_variables, run_script, write_jpegs
from vggjax.inference import classifier, imported
from vggjax.utils.images import load_image

TOL = 1e-5  # probabilities, as the issue asks


def photos(directory, size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): JPEG photos written to disk and read back as Keras' load_img would."""
    paths = write_jpegs(directory, [(size + 7 * k, size + 5 * k) for k in range(n)], seed=seed)
    return np.stack([load_image(p, target_size=(size, size)) for p in paths])


def set_base(model, arch: str, input_rms: float, seed: int) -> None:
    """Random VGG weights that keep activations O(1) for inputs of `input_rms`, by layer name."""
    params = random_variables(arch, include_top=False, seed=seed, input_rms=input_rms)["params"]
    for layer in model.layers:
        if layer.name in params:
            layer.set_weights([params[layer.name]["kernel"], params[layer.name]["bias"]])


def spread_output(keras, model, x: np.ndarray) -> None:
    """Centre and scale the output layer on the inputs `x` (logits of mean 0, std 1), so the
    random model's probabilities differ between photos instead of saturating."""
    hidden = keras.Model(model.inputs, model.layers[-2].output).predict(x, verbose=0)
    kernel, bias = model.layers[-1].get_weights()
    logits = hidden @ kernel + bias
    scale = 1.0 / logits.std(axis=0)
    model.layers[-1].set_weights([kernel * scale, (bias - logits.mean(axis=0)) * scale])


def keras_probabilities(model, x: np.ndarray) -> np.ndarray:
    """(N, K) class probabilities of Keras' predict: a sigmoid output p becomes (1 - p, p)."""
    p = model.predict(x, verbose=0).astype(np.float64)
    return np.concatenate([1 - p, p], axis=1) if p.shape[1] == 1 else p


def assert_imported_matches(what, clf, model, pixels, keras_inputs):
    want = keras_probabilities(model, keras_inputs)
    assert want[:, -1].std() > 0.01, f"{what}: the random model predicts the same for every photo"
    got = classifier.predict(clf, pixels)
    assert_parity(what, got, want, tol=TOL)


SIZE = 32  # 32x32 photos: 1x1x512 features, a fast test with every layer of the book's models


@pytest.fixture(scope="module")
def book_models(keras, tmp_path_factory):
    """The book's two fine-tuning models on one random VGG16 base, saved by Keras itself: the
    2nd edition's functional .keras (augmentation, preprocess_input and Dropout inside; a Dense
    without activation) and the 1st edition's Sequential .h5 (fed x/255 from outside)."""
    from keras import layers

    keras.utils.set_random_seed(0)  # the Dense layers: the same models every run
    d = tmp_path_factory.mktemp("book")
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    set_base(base, "vgg16", CAFFE_INPUT_RMS, seed=1)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.1),
                          layers.RandomZoom(0.2)])(inputs)
    x = base(keras.applications.vgg16.preprocess_input(x))
    x = layers.Dropout(0.5)(layers.Dense(256)(layers.Flatten()(x)))
    second = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))

    rescaled = keras.applications.VGG16(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    set_base(rescaled, "vgg16", 1.0, seed=2)
    first = keras.Sequential([keras.Input((SIZE, SIZE, 3)), rescaled, layers.Flatten(),
                              layers.Dense(256, activation="relu"), layers.Dense(1, activation="sigmoid")])
    pixels = photos(d, SIZE)
    spread_output(keras, second, pixels.astype(np.float32))
    spread_output(keras, first, pixels.astype(np.float32) / 255)
    second.save(d / "fine_tuning.keras")
    first.save(d / "cats_and_dogs_small_3.h5")
    return d, second, first, pixels


def test_second_edition_keras_file_predicts_as_keras(book_models, tmp_path):
    d, model, _, pixels = book_models
    with zipfile.ZipFile(d / "fine_tuning.keras") as z:  # what Keras 3 saves of preprocess_input
        kinds = [l["class_name"] for l in json.loads(z.read("config.json"))["config"]["layers"]]
    assert kinds[2:7] == ["GetItem", "GetItem", "GetItem", "Stack", "Add"]
    clf = imported.from_keras(d / "fine_tuning.keras", tmp_path / "clf", class_names=["cats", "dogs"])
    assert clf.preprocessing == "caffe" and clf.image_size == SIZE and clf.class_names == ("cats", "dogs")
    head = clf.model.head
    assert (head.units, head.activation, head.dropout_rate, head.num_outputs) == (256, None, 0.5, 1)
    assert_imported_matches("2nd edition .keras", clf, model, pixels, pixels.astype(np.float32))
    assert classifier.load_classifier(tmp_path / "clf").meta["imported_from"]["keras_output_activation"] == "sigmoid"


def test_first_edition_h5_needs_preprocess_and_predicts_as_keras(book_models, tmp_path):
    d, _, model, pixels = book_models
    path = d / "cats_and_dogs_small_3.h5"
    with pytest.raises(ValueError, match=r"no preprocessing inside.*--preprocess \(rescale"):
        imported.from_keras(path, tmp_path / "clf")
    assert not (tmp_path / "clf").exists()
    clf = imported.from_keras(path, tmp_path / "clf", preprocess="rescale")
    assert clf.preprocessing == "rescale" and clf.class_names == ("0", "1")
    assert (clf.model.head.activation, clf.model.head.dropout_rate) == ("relu", 0.0)
    base_meta = json.loads((tmp_path / "clf" / "base" / "vggjax.json").read_text())
    assert base_meta["preprocessing"] == "rescale" and base_meta["source"] == "keras"
    assert_imported_matches("1st edition .h5 (x/255 outside)", clf, model, pixels,
                            pixels.astype(np.float32) / 255)


def test_keras_file_given_as_weights_is_named_as_a_model(book_models, tmp_path):
    from vggjax.weights import convert_file

    d = book_models[0]
    with pytest.raises(ValueError, match=r"is a Keras 3 \.keras model \(a zip\), not a weights file.*no --arch"):
        convert_file("keras", "vgg16", d / "fine_tuning.keras", tmp_path / "out")


def refusal(keras, tmp_path, build) -> str:
    """The one-line ValueError of importing the model `build(keras, layers)` saved as .keras."""
    from keras import layers

    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "odd.keras"
    build(keras, layers).save(path)
    with pytest.raises(ValueError) as err:
        imported.from_keras(path, tmp_path / "clf", preprocess="caffe")
    assert "\n" not in str(err.value) and not (tmp_path / "clf").exists()
    return str(err.value)


def test_an_unsupported_layer_is_refused_in_one_line_naming_it(keras, tmp_path):
    def batch_norm_head(keras, layers):
        inputs = keras.Input((SIZE, SIZE, 3))
        x = keras.applications.VGG16(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))(inputs)
        x = layers.BatchNormalization(name="bn")(layers.Flatten()(x))
        return keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))

    message = refusal(keras, tmp_path, batch_norm_head)
    assert "layer 'bn' (BatchNormalization) is not supported: vggjax imports" in message


def test_a_non_vgg_base_and_a_linear_output_are_refused(keras, tmp_path):
    def small_convnet(keras, layers):
        return keras.Sequential([keras.Input((SIZE, SIZE, 3)), layers.Conv2D(8, 3, name="c"),
                                 layers.Flatten(), layers.Dense(1, activation="sigmoid")])

    assert "the conv base has 1 Conv2D layers; vggjax imports Keras' VGG16" in refusal(
        keras, tmp_path / "a", small_convnet)

    def logits_out(keras, layers):
        inputs = keras.Input((SIZE, SIZE, 3))
        x = keras.applications.VGG16(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))(inputs)
        return keras.Model(inputs, layers.Dense(2, name="out")(layers.Flatten()(x)))

    assert "layer 'out' (Dense) ends the model with 2 unit(s) and activation 'linear'" in refusal(
        keras, tmp_path / "b", logits_out)


@pytest.fixture(scope="module")
def fine_tuned_torchvision(tmp_path_factory):
    """A torchvision VGG16 fine-tuned the usual PyTorch way (classifier[6] replaced by a 2-class
    Linear), random weights, saved with torch.save(model.state_dict())."""
    import torch

    from vggjax.testing.reference import randomize, vgg

    d = tmp_path_factory.mktemp("torch")
    with torch.device("meta"):
        model = vgg("vgg16")
        model.classifier[6] = torch.nn.Linear(4096, 2)
    model = randomize(model.to_empty(device="cpu"), seed=3)
    torch.save(model.state_dict(), d / "catsdogs_vgg16.pth")
    return d, model


def torch_probabilities(model, pixels: np.ndarray) -> np.ndarray:
    """softmax of the PyTorch module's logits on torchvision-normalised pixels (NCHW)."""
    import torch

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((pixels / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)).double(), dim=1).numpy()


@pytest.mark.slow  # a 528 MB state dict: ~1 min on 2 cores
def test_fine_tuned_torchvision_vgg16_predicts_as_pytorch(fine_tuned_torchvision, tmp_path):
    d, model = fine_tuned_torchvision
    clf = imported.from_torch(d / "catsdogs_vgg16.pth", "vgg16", tmp_path / "clf",
                              class_names=("cats", "dogs"), image_size=SIZE)
    assert (clf.preprocessing, clf.model.head.pooling, clf.model.head.units) == ("torch", "torch", (4096, 4096))
    pixels = photos(tmp_path, SIZE, seed=4)
    want = torch_probabilities(model, pixels)
    assert want[:, 1].std() > 0.01
    assert_parity("fine-tuned torchvision vgg16 .pth", classifier.predict(clf, pixels), want, tol=TOL)
    with pytest.raises(ValueError, match=r"--class-names gives 3 name\(s\).*has 2 classes"):
        imported.from_torch(d / "catsdogs_vgg16.pth", "vgg16", tmp_path / "other", class_names="a b c".split())


@pytest.mark.slow  # four scripts in subprocesses, ONNX export and a fine-tuning epoch: ~3 min
def test_imported_keras_model_predicts_exports_to_onnx_and_fine_tunes(book_models, tmp_path,
                                                                      subprocess_env):
    """The issue's "done when", as a user runs it: the 2nd edition's .keras imported by
    tools/convert_weights.py, classified by tools/predict.py, exported to ONNX by tools/export.py
    (onnxruntime's probabilities equal Keras'), and fine-tuned one more epoch by the example."""
    from vggjax.inference import artifact
    from vggjax.train.synthetic import make_image_folder

    d, model, _, pixels = book_models
    clf_dir = tmp_path / "catsdogs"
    done = run_script("tools/convert_weights.py", "--source", "keras", "--input", d / "fine_tuning.keras",
                      "--class-names", "discs,stripes", "--output", clf_dir, env=subprocess_env)
    assert done.returncode == 0, done.stderr
    assert "preprocessing caffe, head flatten -> [256] -> 1, classes ['discs', 'stripes']" in done.stdout

    photo = write_jpegs(tmp_path, [(SIZE, SIZE)], seed=9)[0]
    done = run_script("tools/predict.py", photo, "--weights", clf_dir, "--json", env=subprocess_env)
    assert done.returncode == 0, done.stderr
    p_stripes = float(keras_probabilities(model, load_image(photo)[None].astype(np.float32))[0, 1])
    top = {t["name"]: t["probability"] for t in json.loads(done.stdout)[0]["top"]}
    assert abs(top["stripes"] - p_stripes) <= TOL

    done = run_script("tools/export.py", clf_dir, "--format", "onnx", "--output", tmp_path / "onnx",
                      env=subprocess_env)
    assert done.returncode == 0, done.stderr
    onnx = artifact.load(tmp_path / "onnx").probabilities(pixels)
    assert_parity("imported .keras exported to ONNX", onnx, keras_probabilities(model, pixels.astype(np.float32)),
                  tol=TOL)

    data = make_image_folder(tmp_path / "data", sizes={"train": 4, "validation": 2, "test": 2}, jpeg_size=40)
    done = run_script("examples/finetune_catsdogs.py", "--weights", clf_dir, "--data", data, "--phases",
                      "finetune", "--epochs", "1", "--image-size", str(SIZE), "--batch-size", "4",
                      "--workdir", tmp_path / "run", env=subprocess_env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "continues from the classifier" in done.stdout + done.stderr
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert list(history) == ["finetune"] and len(history["finetune"]) == 1
    tuned = classifier.load_classifier(tmp_path / "run" / "classifiers" / "finetune")
    assert tuned.model.head == classifier.load_classifier(clf_dir).model.head


@pytest.mark.slow  # two more VGG bases (one a VGG19) compiled: ~1 min
@pytest.mark.parametrize("structure", ["vgg19 avg-pooled rescaling softmax .h5",
                                       "inline vgg16 max-pooled .weights.h5 + architecture"])
def test_other_structures_predict_as_keras(keras, tmp_path, structure):
    """The rest of what the importer reads: a VGG19 base with pooling="avg" behind
    Rescaling(1/255), two relu hidden layers each followed by Dropout, a 3-way softmax, in a
    legacy .h5; and a VGG16 whose layers sit in the model itself (Model(base.input, ...)),
    GlobalMaxPooling2D, Dropout then Dense(2, softmax), saved as .weights.h5 with model.to_json()."""
    from keras import layers

    keras.utils.set_random_seed(1)
    pixels = photos(tmp_path, SIZE, n=4, seed=5)
    if structure.startswith("vgg19"):
        base = keras.applications.VGG19(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3),
                                        pooling="avg")
        set_base(base, "vgg19", 1.0, seed=6)
        inputs = keras.Input((SIZE, SIZE, 3))
        x = base(layers.Rescaling(1 / 255)(inputs))
        x = layers.Dropout(0.3)(layers.Dense(64, activation="relu")(x))
        x = layers.Dropout(0.3)(layers.Dense(32, activation="relu")(x))
        model = keras.Model(inputs, layers.Dense(3, activation="softmax")(x))
        spread_output(keras, model, pixels.astype(np.float32))
        path, architecture = tmp_path / "model.h5", None
        model.save(path)
    else:
        base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
        set_base(base, "vgg16", CAFFE_INPUT_RMS, seed=7)
        x = layers.Dropout(0.2)(layers.GlobalMaxPooling2D()(base.output))
        model = keras.Model(base.input, layers.Dense(2, activation="softmax")(x))
        spread_output(keras, model, keras.applications.vgg16.preprocess_input(pixels.astype(np.float32)))
        path, architecture = tmp_path / "model.weights.h5", tmp_path / "model.json"
        model.save_weights(path)
        architecture.write_text(model.to_json())
    mode = "rescale" if structure.startswith("vgg19") else "caffe"
    clf = imported.from_keras(path, tmp_path / "clf", preprocess=None if mode == "rescale" else "caffe",
                              architecture=architecture)
    assert clf.preprocessing == mode
    keras_inputs = pixels.astype(np.float32)
    if mode == "caffe":  # preprocess_input done outside the model, as --preprocess caffe says
        keras_inputs = keras.applications.vgg16.preprocess_input(keras_inputs)
    assert_imported_matches(structure, clf, model, pixels, keras_inputs)


def test_damaged_and_weights_only_files_fail_in_one_line(book_models, tmp_path):
    d = book_models[0]
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes((d / "fine_tuning.keras").read_bytes()[:100_000])
    weights_only = tmp_path / "vgg16.weights.h5"
    import h5py
    with h5py.File(weights_only, "w") as f:
        f.create_group("layers")
    not_keras = tmp_path / "other.keras"
    with zipfile.ZipFile(not_keras, "w") as z:
        z.writestr("readme.txt", "hello")
    for path, pattern in [(truncated, r"neither a \.keras zip nor a readable HDF5 file"),
                          (weights_only, r"holds weights only \(no model_config\): give the model's "
                                         r"architecture with --architecture FILE.*or convert VGG weights with --arch"),
                          (not_keras, r"is a zip file but not a Keras \.keras model: it lacks \['config.json'")]:
        with pytest.raises(ValueError, match=pattern) as err:
            imported.from_keras(path, tmp_path / "clf", preprocess="caffe")
        assert "\n" not in str(err.value) and not (tmp_path / "clf").exists()
