"""The command line: predict on real photographs shipped by scikit-image, bad files, JSON output."""
import json
from pathlib import Path

import pytest
import torch

import mambazoo
from mambazoo.cli import main

SMALL = dict(dim=8, in_dim=4, depths=[1, 1, 2, 2], num_heads=[1, 1, 2, 2])
SMALL_ARGS = ['--model-kwargs', 'dim=8', 'in_dim=4', 'depths=[1,1,2,2]', 'num_heads=[1,1,2,2]']


@pytest.fixture(scope='module')
def photos():
    skdata = pytest.importorskip('skimage.data')
    folder = Path(skdata.__file__).parent
    return [str(folder / name) for name in ('chelsea.png', 'rocket.jpg', 'camera.png')]  # RGB png, jpeg, grayscale


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """A small MambaVision in the official release layout, with 1000 classes (ImageNet names)."""
    torch.manual_seed(0)
    model = mambazoo.create_model('mambavision_tiny', **SMALL)
    path = tmp_path_factory.mktemp('ckpt') / 'small.pth.tar'
    torch.save({'state_dict': model.state_dict()}, path)
    return path, model


def _predict(args, capsys):
    code = main(['predict', *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predict_json_matches_library(photos, tiny_checkpoint, capsys):
    path, model = tiny_checkpoint
    code, out, _ = _predict([*photos, '--model', 'mamba_vision_T', '--checkpoint', str(path), '--json', *SMALL_ARGS],
                            capsys)
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
    code, out, err = _predict([photos[0], str(not_image), str(truncated), str(missing), '--model', 'mambavision_tiny',
                               '--checkpoint', str(path), *SMALL_ARGS], capsys)
    assert code == 1
    assert photos[0] in out and 'throughput: 1 images' in out
    assert 'not an image file' in err and str(not_image) in err
    assert 'cannot decode' in err and str(truncated) in err
    assert 'no such file' in err and str(missing) in err
    assert '3 of 4 files could not be classified' in err


def test_predict_unknown_model_and_bad_checkpoint(photos, tmp_path, capsys):
    code, _, err = _predict([photos[0], '--model', 'no_such_model'], capsys)
    assert code == 2 and 'Unknown model' in err
    corrupt = tmp_path / 'bad.pth'
    corrupt.write_bytes(b'\x00' * 100)
    code, _, err = _predict([photos[0], '--model', 'mambavision_tiny', '--checkpoint', str(corrupt),
                             *SMALL_ARGS], capsys)
    assert code == 2 and str(corrupt) in err


def test_list_and_random_checkpoint(tmp_path, capsys):
    assert main(['list', 'mambavision_t*', '--aliases']) == 0
    names = capsys.readouterr().out.split()
    assert 'mambavision_tiny' in names and 'mambavision_tiny2' in names
    out = tmp_path / 'r.pth.tar'
    assert main(['random-checkpoint', '--model', 'mambavision_tiny', '--out', str(out), '--num-classes', '10',
                 *SMALL_ARGS]) == 0
    model = mambazoo.create_model('mambavision_tiny', checkpoint_path=out, num_classes=10, **SMALL)
    assert model.head.out_features == 10
