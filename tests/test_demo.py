"""The Gradio demo: predictions and overlays on a real photo, a checkpoint of our trainer, and the page itself
served by ``mambazoo demo`` and driven in headless Chromium (upload a photo, click, read the predictions)."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

import mambazoo
from helpers import PROJECT_ROOT, TINY_MAMBAVISION, TINY_MAMBAVISION_ARGS, TINY_MAMBAVISION_YAML
from mambazoo.cli import main
from mambazoo.demo import _model_view_box, predict_image
from mambazoo.predict import build_eval_transform, class_names

CHROMIUM = Path('/usr/bin/chromium')


@pytest.fixture(scope='module')
def chelsea():
    skdata = pytest.importorskip('skimage.data')
    return Image.fromarray(skdata.chelsea())  # 451 x 300 RGB photo of a cat


@pytest.fixture(scope='module')
def trained_checkpoint(tmp_path_factory):
    """A real (very short) run of our trainer on scikit-learn's grayscale digits: 1 channel, classes '0'..'9'."""
    from mambazoo.train import load_config, train
    out = tmp_path_factory.mktemp('digits') / 'run'
    threads = torch.get_num_threads()
    try:
        config = load_config(None, [
            f'model.kwargs={TINY_MAMBAVISION_YAML}',
            'data.name=digits', 'data.img_size=32', 'data.batch_size=32', 'sched.epochs=1', 'optim.lr=0.01',
            'train.max_steps_per_epoch=6', 'train.progress=false', 'train.tensorboard=false', 'train.plots=false',
            'train.threads=1', f'train.output={out}'])
        train(config)
    finally:
        torch.set_num_threads(threads)
    return out / 'last.pth', config


# ---------------------------------------------------------------------------------------------------------
# predict_image without a browser

def test_predict_image_top5_and_overlay_on_a_photo(chelsea):
    torch.manual_seed(0)
    model = mambazoo.create_model('mambavision_tiny', **TINY_MAMBAVISION).eval()  # 1000 classes: ImageNet names
    top, overlay = predict_image(model, chelsea, topk=5)

    with torch.no_grad():
        probs = model(build_eval_transform(model)(chelsea).unsqueeze(0)).softmax(-1)[0]
    expected = probs.topk(5)
    names = class_names(1000)
    assert list(top) == [names[i] for i in expected.indices.tolist()]
    assert list(top.values()) == pytest.approx(expected.values.tolist(), rel=1e-5)
    values = list(top.values())
    assert values == sorted(values, reverse=True) and 0 < sum(values) <= 1 + 1e-6

    assert overlay.size == chelsea.size and overlay.mode == 'RGB'
    a, b = np.asarray(overlay).astype(int), np.asarray(chelsea).astype(int)
    # crop_pct 1.0, center mode: the model sees the central 300 x 300 square (columns 75.5..375.5) of the photo.
    assert np.array_equal(a[:, :75], b[:, :75]) and np.array_equal(a[:, 377:], b[:, 377:])
    inside = a[:, 78:374]
    assert np.abs(inside - b[:, 78:374]).mean() > 5 and inside.std() > 5  # coloured, and not a constant map


def test_predict_image_bad_input(chelsea):
    model = mambazoo.create_model('mambavision_tiny', num_classes=3, **TINY_MAMBAVISION)
    with pytest.raises(ValueError, match='upload'):
        predict_image(model, None)
    with pytest.raises(TypeError, match='PIL'):
        predict_image(model, np.asarray(chelsea))
    with pytest.raises(ValueError, match='topk'):
        predict_image(model, chelsea, topk=0)
    with pytest.raises(ValueError, match='2 class names for a model with 3 classes'):
        predict_image(model, chelsea, labels=['a', 'b'])


@pytest.mark.parametrize('input_size,crop_pct,crop_mode,image_size', [
    (224, 0.875, 'center', (451, 300)), (224, 1.0, 'center', (300, 451)), (64, 0.9, 'squash', (200, 120))])
def test_model_view_box_matches_timm_transform(input_size, crop_pct, crop_mode, image_size):
    """The box is where timm's own evaluation crop comes from: images whose pixels hold their own x (or y)
    coordinate, resized with nearest-neighbour sampling, tell which original columns/rows reach the crop's edges."""
    from timm.data import create_transform
    width, height = image_size
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    transform = create_transform(input_size=(1, input_size, input_size), crop_pct=crop_pct, crop_mode=crop_mode,
                                 interpolation='nearest', mean=(0,), std=(1,), is_training=False)
    crop_x, crop_y = (transform(Image.fromarray(c, mode='F')) for c in (xs, ys))
    seen = (crop_x.min().item(), crop_y.min().item(), crop_x.max().item() + 1, crop_y.max().item() + 1)
    box = _model_view_box(image_size, dict(input_size=(3, input_size, input_size), crop_pct=crop_pct,
                                           crop_mode=crop_mode))
    assert box == pytest.approx(seen, abs=2)


def test_trained_checkpoint_gives_its_classes_channels_and_preprocessing(trained_checkpoint, chelsea):
    path, config = trained_checkpoint
    model = mambazoo.load_model(path)  # the architecture comes from the checkpoint
    labels = class_names(model)
    assert labels == [str(i) for i in range(10)]
    assert model.pretrained_cfg['input_size'] == (1, 32, 32)
    state = torch.load(path, map_location='cpu', weights_only=True)['model']
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    # The trainer's own validation transform (grayscale, 32 px, its mean/std) on the same photo.
    from mambazoo.data.loader import build_data
    from mambazoo.models._builder import get_pretrained_cfg  # what the trainer passes to build_data
    val_transform = build_data(config, get_pretrained_cfg(config['model']['name'])).test.transform
    with torch.no_grad():
        probs = model(val_transform(chelsea).unsqueeze(0)).softmax(-1)[0]
    top, overlay = predict_image(model, chelsea, topk=3, labels=labels)
    assert list(top) == [labels[i] for i in probs.topk(3).indices.tolist()]
    assert list(top.values()) == pytest.approx(probs.topk(3).values.tolist(), rel=1e-5)
    assert overlay.size == chelsea.size


def test_cli_demo_errors(tmp_path, capsys):
    assert main(['demo']) == 2
    assert 'name a model' in capsys.readouterr().err
    assert main(['demo', '--model', 'no_such_model']) == 2
    assert 'Unknown model' in capsys.readouterr().err
    bad = tmp_path / 'broken.pth'
    bad.write_bytes(b'not a checkpoint')
    assert main(['demo', '--model', 'mambavision_tiny', '--checkpoint', str(bad), *TINY_MAMBAVISION_ARGS]) == 2
    assert 'cannot read checkpoint' in capsys.readouterr().err
    assert main(['demo', '--model', 'mambavision_tiny', '--num-classes', '0', *TINY_MAMBAVISION_ARGS]) == 2
    assert 'num_classes > 0' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The page in a real browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f'`mambazoo demo` exited with {proc.returncode}:\n{log.read_text()}')
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f'`mambazoo demo` did not answer at {url} within {timeout:.0f} s:\n{log.read_text()}')


@pytest.mark.slow  # ~30-45 s on 2 busy cores: a server process (torch + gradio imports) and a browser
def test_demo_in_headless_chromium(trained_checkpoint, chelsea, tmp_path):
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (test extra)')
    pytest.importorskip('gradio', reason='gradio is not installed (demo extra)')
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (scripts/setup.sh --browser)")
    path, _ = trained_checkpoint
    photo = tmp_path / 'chelsea.png'
    chelsea.save(photo)
    model = mambazoo.load_model(path)
    labels = class_names(model)
    expected, _ = predict_image(model, Image.open(photo), labels=labels)

    port = _free_port()
    url = f'http://127.0.0.1:{port}/'
    log = tmp_path / 'demo.log'
    env = dict(os.environ, HF_HUB_OFFLINE='1', GRADIO_ANALYTICS_ENABLED='False', OMP_NUM_THREADS='1')
    with open(log, 'w') as log_file:
        proc = subprocess.Popen([sys.executable, '-m', 'mambazoo.cli', 'demo', '--checkpoint', str(path),
                                 '--port', str(port)], cwd=PROJECT_ROOT, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT)
    outside = []

    def local_only(route):  # the page must work offline: anything not served by the demo is refused and noted
        if urlparse(route.request.url).hostname in ('127.0.0.1', 'localhost'):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    try:
        _wait_for_server(url, proc, log)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                         args=['--no-sandbox'] if os.geteuid() == 0 else [])
            try:
                page = browser.new_page()
                page.set_default_timeout(30_000)
                page.route('**/*', local_only)
                page.goto(url)
                page.set_input_files('#input-image input[type="file"]', str(photo))
                page.wait_for_selector('#input-image img')  # the upload finished and is previewed
                page.click('#submit')
                heading = page.wait_for_selector('#predictions [data-testid="label-output-value"]')
                shown_top1 = heading.inner_text().strip()
                shown = [t.strip() for t in page.locator('#predictions dt').all_inner_texts()]
                page.wait_for_selector('#activation-map img')
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert shown_top1 == next(iter(expected)), log.read_text()
    assert shown == list(expected)
    assert outside == []
