"""The analysis commands: flops, summary, analyze erf|activations, show-data, benchmark; files written and named."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import TINY_MAMBAVISION_ARGS, run_cli, skimage_photos


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
    """An image folder with two class folders of real photographs (scikit-image's)."""
    root = tmp_path_factory.mktemp('photos')
    for cls, names in {'cat': ['chelsea.png', 'coffee.png'], 'people': ['astronaut.png', 'camera.png']}.items():
        (root / cls).mkdir()
        for photo in skimage_photos(*names):
            shutil.copy(photo, root / cls / photo.name)
    return root


def _written_png(out: str) -> Path:
    match = re.search(r'wrote (\S+\.png)', out)
    assert match, out
    path = Path(match.group(1))
    pixels = np.asarray(Image.open(path).convert('RGB'))
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, 'a constant picture'
    return path


def test_flops_states_convention_and_published_figure(capsys):
    code, out, _ = run_cli(['flops', '--model', 'mambavision_tiny'], capsys)
    assert code == 0
    assert 'one multiply-add = 1 FLOP' in out and 'published: 4.4G' in out and 'without attention' in out
    code, out, _ = run_cli(['flops', '--model', 'vmamba_tiny', '--json'], capsys)
    report = json.loads(out)
    assert report['published']['matches'] and abs(report['gflops'] - 4.9) < 0.05 * 4.9
    code, _, err = run_cli(['flops', '--model', 'no_such_model'], capsys)
    assert code == 2 and 'unknown model' in err.lower()


def test_summary(capsys):
    code, out, _ = run_cli(['summary', '--model', 'mambaout_femto'], capsys)
    assert code == 0 and '| stages.2 | 2 | 9x GatedCNNBlock + downsample |' in out and '7,304,536' in out
    code, out, _ = run_cli(['summary', '--model', 'mambavision_tiny', '--img-size', '64', '--json',
                            *TINY_MAMBAVISION_ARGS], capsys)
    assert code == 0 and len([r for r in json.loads(out)['rows'] if r['is_stage']]) == 4


@pytest.mark.parametrize('what', ['erf', 'activations'])
def test_analyze_writes_png(what, photo_folder, tmp_path, capsys):
    out_path = tmp_path / f'{what}.png'
    code, out, _ = run_cli(['analyze', what, '--model', 'mambavision_tiny', '--data', str(photo_folder),
                            '--num-images', '2', '--img-size', '64', '--out', str(out_path), *TINY_MAMBAVISION_ARGS],
                           capsys)
    assert code == 0
    assert _written_png(out) == out_path
    if what == 'erf':
        assert 'high-contribution area ratio' in out


def test_analyze_bad_input(tmp_path, capsys):
    code, _, err = run_cli(['analyze', 'erf', '--model', 'mambavision_tiny', '--data', str(tmp_path / 'missing'),
                            *TINY_MAMBAVISION_ARGS], capsys)
    assert code == 2 and 'no such image file or folder' in err


def test_show_data(photo_folder, tmp_path, capsys):
    code, out, _ = run_cli(['show-data', '--data', 'digits', '--count', '6', '--img-size', '32',
                            '--out', str(tmp_path / 'digits.png')], capsys)
    assert code == 0 and _written_png(out) == tmp_path / 'digits.png'
    code, out, _ = run_cli(['show-data', '--data', str(photo_folder), '--count', '4', '--augment', '--img-size', '64',
                            '--out', str(tmp_path / 'folder.png')], capsys)
    assert code == 0 and _written_png(out) == tmp_path / 'folder.png'
    code, _, err = run_cli(['show-data', '--data', 'no_such_set'], capsys)
    assert code == 2 and 'unknown dataset' in err


def test_benchmark_json_and_file(tmp_path, capsys):
    out_file = tmp_path / 'bench.json'
    code, out, err = run_cli(['benchmark', '--model', 'mambavision_tiny', '--baseline', 'test_vit', '--img-size', '32',
                              '--batch-size', '2', '--warmup', '0', '--iters', '1', '--json', '--out', str(out_file),
                              *TINY_MAMBAVISION_ARGS], capsys)
    assert code == 0
    report = json.loads(out)
    assert json.loads(out_file.read_text()) == report and f'wrote {out_file}' in err
    assert [r['model'] for r in report['results']] == ['mambavision_tiny', 'test_vit']
    assert all(set(r) == set(report['fields']) and r['infer_images_per_s'] > 0 for r in report['results'])
    code, _, err = run_cli(['benchmark', '--model', 'no_such_model'], capsys)
    assert code == 2 and 'unknown model' in err
    code, _, err = run_cli(['benchmark', '--model', 'test_vit', '--sweep', '32,x'], capsys)
    assert code == 2 and '--sweep' in err
