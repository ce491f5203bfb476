"""The command line misused (issue 18, "one error style for the whole CLI"): every usage, config, data, checkpoint
and file problem prints one ``error: ...`` line on stderr naming what is wrong and what would fix it, exits with
status 2 and shows no traceback (``--debug`` shows it instead); ``predict`` goes on file by file and exits with 1.

Each case runs ``mambazoo.cli.main`` in this process on files made in a temporary folder; the models are a tiny
MambaVision and the data sets ``fake`` (generated) or none, so nothing is downloaded.
"""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import mambazoo
from helpers import TINY_MAMBAVISION, TINY_MAMBAVISION_ARGS, TINY_TRAIN_SETS, run_cli
from mambazoo.cli import main
from mambazoo.models import CheckpointError
from mambazoo.train.config import ConfigError


class CustomObject:
    """A class of this test module pickled beside the weights: torch's safe loader must refuse it."""


CUSTOM_CLASS = f'{CustomObject.__module__}.{CustomObject.__qualname__}'
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a CUDA GPU')


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """train sets torch's thread count for the process; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _png(path, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _png_header_only(path, width, height):
    """A PNG whose header says ``width`` x ``height`` (8-bit RGB) followed by a token of pixel data: a few hundred
    bytes that claim a huge image, as a decompression bomb does."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
                     + chunk(b'IEND', b''))
    return path


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """The files the cases name: an image, a broken YAML, a plain file, a folder, a checkpoint holding a pickled
    object of a custom class beside a (tiny MambaVision) state dict."""
    tmp = tmp_path_factory.mktemp('misuse')
    _png(tmp / 'good.png')
    # Line 3 is indented by one space: not a key of 'sched', not a top-level key either.
    (tmp / 'broken.yaml').write_text('sched:\n  epochs: 2\n train: 3\n')
    (tmp / 'a_file.txt').write_text('not a folder\n')
    (tmp / 'a_folder').mkdir()
    torch.manual_seed(0)
    model = mambazoo.create_model('mambavision_tiny', **TINY_MAMBAVISION)
    torch.save({'model': model.state_dict(), 'x': CustomObject()}, tmp / 'custom.pth')
    return tmp


def _train(*sets: str, options=()) -> list:
    """``train`` on 16 generated 32 px images (2 steps of 8), into the case's own folder, with extra ``--set``s."""
    return ['train', *options, '--output', '{out}', '--set', *TINY_TRAIN_SETS, 'data.name=fake',
            'data.fake_size=[16,8]', 'sched.epochs=1', 'train.max_steps_per_epoch=2', *sets]


PREDICT = ['predict', '{img}', '--model', 'mambavision_tiny', *TINY_MAMBAVISION_ARGS]

# (id, argv, what the error line must say: one substring or a tuple of them). {tmp}: the workspace, {out}: a
# folder of the case's own (not created), {img}: a good PNG, {custom_class}: CustomObject's pickled name.
CASES = [
    ('train-missing-config', ['train', '--config', '{tmp}/missing.yaml', '--output', '{out}'],
     'config file not found: {tmp}/missing.yaml'),
    ('train-malformed-yaml', ['train', '--config', '{tmp}/broken.yaml', '--output', '{out}'],
     '{tmp}/broken.yaml: invalid YAML at line 3'),
    ('train-unknown-set-key', _train('sched.epoch=2'),
     ("unknown config key 'sched.epoch'", "did you mean 'sched.epochs'")),
    ('train-wrong-type', _train('sched.epochs=two'), "config key 'sched.epochs' must be an integer, got 'two'"),
    ('train-negative-lr', _train('optim.lr=-0.1'), "config key 'optim.lr' must be a positive number, got -0.1"),
    ('train-batch-larger-than-data', _train('data.fake_size=[8,8]', 'data.batch_size=64'),
     ('the training set (8 images) is smaller than one step', '64')),
    ('train-output-is-a-file', ['train', '--output', '{tmp}/a_file.txt', '--set', *TINY_TRAIN_SETS, 'data.name=fake'],
     ('the output {tmp}/a_file.txt is a file', '--output')),
    ('train-nan-loss', _train('optim.lr=1e30'), ('loss is', 'lower the learning rate')),
    ('train-resume-nothing', _train(options=['--resume']), ('nothing to resume', '{out}/last.pth')),
    ('export-onnx-out-is-a-folder',
     ['export', '--model', 'mambavision_tiny', *TINY_MAMBAVISION_ARGS, '--format', 'onnx', '--out', '{tmp}/a_folder'],
     ('--out {tmp}/a_folder is a folder', 'model.onnx')),
    ('predict-topk-0', [*PREDICT, '--topk', '0'], '--topk must be at least 1, got 0'),
    ('predict-topk-negative', [*PREDICT, '--topk', '-1'], '--topk must be at least 1, got -1'),
    ('predict-batch-size-0', [*PREDICT, '--batch-size', '0'], '--batch-size must be at least 1, got 0'),
    pytest.param('predict-device-cuda', [*PREDICT, '--device', 'cuda'], ('no CUDA GPU', 'use --device cpu'),
                 marks=NO_GPU),
    pytest.param('validate-device-cuda', ['validate', '--checkpoint', '{tmp}/custom.pth', '--data', 'digits',
                                          '--device', 'cuda'], ('no CUDA GPU', 'use --device cpu'), marks=NO_GPU),
    ('validate-missing-checkpoint', ['validate', '--checkpoint', '{tmp}/missing.pth', '--data', 'digits'],
     'checkpoint file not found: {tmp}/missing.pth'),
    ('predict-no-model', ['predict', '{img}'], ('--model NAME', '--checkpoint PATH')),
    ('predict-pickled-custom-class', ['predict', '{img}', '--checkpoint', '{tmp}/custom.pth'],
     ('{tmp}/custom.pth', '{custom_class}', '--trusted')),
    # --trusted reads the file; then the next problem is reported: it does not say which model it holds.
    ('predict-pickled-custom-class-trusted', ['predict', '{img}', '--checkpoint', '{tmp}/custom.pth', '--trusted'],
     ('{tmp}/custom.pth does not record which model it holds', '--model NAME')),
    ('predict-unknown-model', ['predict', '{img}', '--model', 'no_such_model'], "Unknown model 'no_such_model'"),
    ('predict-model-kwargs-without-equals', [*PREDICT, 'dim8'], "--model-kwargs expects key=value, got 'dim8'"),
    ('summary-no-model', ['summary'], ('--model NAME', '--checkpoint PATH')),
    ('flops-no-model', ['flops'], ('--model NAME', '--checkpoint PATH')),
    ('benchmark-model-and-checkpoint',
     ['benchmark', '--model', 'mambavision_tiny', '--checkpoint', '{tmp}/custom.pth'], 'not both'),
]


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, 'values') else case[0]


def _fill(text: str, tmp, out) -> str:
    for name, value in (('{tmp}', tmp), ('{out}', out), ('{img}', tmp / 'good.png'), ('{custom_class}', CUSTOM_CLASS)):
        text = text.replace(name, str(value))
    return text


@pytest.mark.parametrize('case_id, argv, expected', CASES, ids=[_case_id(c) for c in CASES])
def test_misuse_is_one_error_line_and_exit_2(case_id, argv, expected, workspace, capsys):
    out = workspace / f'out-{case_id}'
    code, _, err = run_cli([_fill(a, workspace, out) for a in argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert 'Traceback' not in err, err
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    for part in (expected,) if isinstance(expected, str) else expected:
        assert _fill(part, workspace, out) in lines[0], err


@pytest.mark.parametrize('argv, error', [
    (['train', '--config', '{tmp}/missing.yaml', '--output', '{out}'], ConfigError),
    (['predict', '{img}', '--checkpoint', '{tmp}/custom.pth'], CheckpointError),
])
def test_debug_shows_the_traceback(argv, error, workspace):
    with pytest.raises(error):
        main(['--debug', *[_fill(a, workspace, workspace / 'out-debug') for a in argv]])


def test_trusted_loads_a_checkpoint_with_a_custom_class(workspace, capsys):
    """With --trusted and the architecture named, the file's weights are used: predictions, and no note about
    random weights."""
    code, out, err = run_cli(['predict', str(workspace / 'good.png'), '--model', 'mambavision_tiny',
                              '--checkpoint', str(workspace / 'custom.pth'), '--trusted', '--topk', '3',
                              *TINY_MAMBAVISION_ARGS], capsys)
    assert code == 0, err
    assert str(workspace / 'good.png') in out and '  3. ' in out
    assert 'note:' not in err and 'error:' not in err


def test_predict_goes_on_file_by_file(tmp_path, capsys):
    """One good image among a missing file, a folder, a text file and a PNG claiming 20000 x 20000 pixels: the good
    one is classified, each bad one gets its own error line, the exit status is 1."""
    good = _png(tmp_path / 'good.png')
    bad = {
        'missing': (tmp_path / 'missing.png', 'no such file'),
        'folder': (tmp_path / 'a_folder', 'a folder, not an image file'),
        'text': (tmp_path / 'notes.txt', 'not an image file'),
        'huge': (_png_header_only(tmp_path / 'huge.png', 20000, 20000), 'too large to decode safely'),
    }
    (tmp_path / 'a_folder').mkdir()
    (tmp_path / 'notes.txt').write_text('these are notes, not pixels\n')
    paths = [str(good)] + [str(path) for path, _ in bad.values()]
    code, out, err = run_cli(['predict', *paths, '--model', 'mambavision_tiny', '--topk', '3',
                              *TINY_MAMBAVISION_ARGS], capsys)
    assert code == 1, err
    assert 'Traceback' not in err, err
    # The good file's top-3 on stdout, and nothing about the bad ones there.
    assert out.splitlines()[0] == str(good)
    assert [line.split('.')[0].strip() for line in out.splitlines()[1:4]] == ['1', '2', '3']
    assert 'throughput: 1 images' in out
    assert not any(str(path) in out for path, _ in bad.values())
    # One error line per bad file, naming it and saying what is wrong with it.
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == len(bad), err
    for (path, reason), line in zip(bad.values(), errors):
        assert str(path) in line and reason in line, line
    # Random weights are said to be random.
    notes = [line for line in err.splitlines() if line.startswith('note: ')]
    assert len(notes) == 1 and 'random weights' in notes[0], err
