"""The command line: predict on real photographs shipped by scikit-image, bad files, JSON output."""
import json
from pathlib import Path

import pytest
import torch

import mambazoo
from helpers import TINY_MAMBAVISION, TINY_MAMBAVISION_ARGS, run_cli, skimage_photos
from mambazoo.cli import main


@pytest.fixture(scope='module')
def photos():
    return [str(p) for p in skimage_photos('chelsea.png', 'rocket.jpg', 'camera.png')]  # RGB png, jpeg, grayscale


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """A small MambaVision in the official release layout, with 1000 classes (ImageNet names)."""
    torch.manual_seed(0)
    model = mambazoo.create_model('mambavision_tiny', **TINY_MAMBAVISION)
    path = tmp_path_factory.mktemp('ckpt') / 'small.pth.tar'
    torch.save({'state_dict': model.state_dict()}, path)
    return path, model


def test_predict_json_matches_library(photos, tiny_checkpoint, capsys):
    path, model = tiny_checkpoint
    code, out, _ = run_cli(['predict', *photos, '--model', 'mamba_vision_T', '--checkpoint', str(path), '--json',
                            *TINY_MAMBAVISION_ARGS], capsys)
    assert code == 0
    report = json.loads(out)
    assert [r['path'] for r in report['results']] == photos
    from mambazoo.predict import build_eval_transform, load_image
    model.eval()
    x = torch.stack([build_eval_transform(model)(load_image(p)) for p in photos])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    for row, result in zip(probs, report['results']):
        assert result['error'] is None
        assert len(result['top']) == 5
        top = row.topk(5)
        assert [t['index'] for t in result['top']] == top.indices.tolist()
        assert [t['probability'] for t in result['top']] == pytest.approx(top.values.tolist(), rel=1e-5)
        assert result['top'][0]['label'] and not result['top'][0]['label'].startswith('class ')
    assert report['timing']['images'] == 3 and report['timing']['images_per_s'] > 0


def test_predict_reports_bad_files_and_runs_the_rest(photos, tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    not_image = tmp_path / 'notes.jpg'
    not_image.write_text('this is not an image')
    truncated = tmp_path / 'cut.png'
    truncated.write_bytes(Path(photos[0]).read_bytes()[:2000])
    missing = tmp_path / 'missing.png'
    code, out, err = run_cli(['predict', photos[0], str(not_image), str(truncated), str(missing),
                              '--model', 'mambavision_tiny', '--checkpoint', str(path), *TINY_MAMBAVISION_ARGS], capsys)
    assert code == 1
    assert photos[0] in out and 'throughput: 1 images' in out
    assert 'not an image file' in err and str(not_image) in err
    assert 'cannot decode' in err and str(truncated) in err
    assert 'no such file' in err and str(missing) in err
    assert '3 of 4 files could not be classified' in err


def test_predict_unknown_model_and_bad_checkpoint(photos, tmp_path, capsys):
    code, _, err = run_cli(['predict', photos[0], '--model', 'no_such_model'], capsys)
    assert code == 2 and 'Unknown model' in err
    corrupt = tmp_path / 'bad.pth'
    corrupt.write_bytes(b'\x00' * 100)
    code, _, err = run_cli(['predict', photos[0], '--model', 'mambavision_tiny', '--checkpoint', str(corrupt),
                            *TINY_MAMBAVISION_ARGS], capsys)
    assert code == 2 and str(corrupt) in err


def test_list_and_random_checkpoint(tmp_path, capsys):
    assert main(['list', 'mambavision_t*', '--aliases']) == 0
    names = capsys.readouterr().out.split()
    assert 'mambavision_tiny' in names and 'mambavision_tiny2' in names
    out = tmp_path / 'r.pth.tar'
    assert main(['random-checkpoint', '--model', 'mambavision_tiny', '--out', str(out), '--num-classes', '10',
                 *TINY_MAMBAVISION_ARGS]) == 0
    model = mambazoo.create_model('mambavision_tiny', checkpoint_path=out, num_classes=10, **TINY_MAMBAVISION)
    assert model.head.out_features == 10
