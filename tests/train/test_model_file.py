"""The trained model is a self-describing file (issue 18): a run's checkpoint rebuilds its model from the path alone
(``mambazoo.load_model``, ``create_model(name, checkpoint_path=...)``, every command's ``--checkpoint`` without
``--model``), with its class names and its evaluation transform; exported folders, checkpoints of earlier trainer
versions and the official release formats (VMamba's yacs config) load as well, and the safe loader says what it
refuses."""
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import mambazoo
from helpers import TINY_TRAIN_SETS
from mambazoo.cli import main
from mambazoo.data.images import build_eval_transform, eval_data_config
from mambazoo.models import CheckpointError, read_checkpoint, read_model_record
from mambazoo.predict import class_names
from mambazoo.train import load_config, train
from mambazoo.train.checkpoint import load_training_state

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A tiny MambaVision trained for two steps on digits (1 channel, 32 px, bilinear, crop 1.0), with EMA."""
    out = tmp_path_factory.mktemp('model_file') / 'run'
    config = load_config(None, [*TINY_TRAIN_SETS, 'data.name=digits', 'data.interpolation=bilinear',
                                'data.crop_pct=1.0', 'train.max_steps_per_epoch=2', 'sched.epochs=1',
                                'ema.enabled=true', 'ema.decay=0.5', f'train.output={out}'])
    result = train(config)
    return out, result


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp('photos')
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 30), (32, 32)]):
        path = folder / f'photo{i}.png'
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_checkpoint_records_the_model(run):
    out, result = run
    record = read_model_record(out / 'best.pth')
    assert record['name'] == 'mambavision_tiny'
    assert record['args']['in_chans'] == 1 and record['args']['num_classes'] == 10 and record['args']['dim'] == 8
    cfg = record['pretrained_cfg']
    assert cfg['input_size'] == [1, 32, 32] and cfg['interpolation'] == 'bilinear' and cfg['crop_pct'] == 1.0
    assert cfg['label_names'] == DIGITS and len(cfg['mean']) == 1
    assert record['weights'] in ('model', 'ema')
    assert read_model_record(out / 'last.pth')['weights'] == 'model'


def test_load_model_rebuilds_the_trained_model(run):
    out, result = run
    model = mambazoo.load_model(out / 'best.pth')
    assert not model.training and model.in_chans == 1 and model.num_classes == 10
    assert class_names(model) == DIGITS
    assert not any(model.pretrained_cfg.get(k) for k in ('hf_hub_id', 'url', 'tag'))  # not a release's weights
    ckpt = load_training_state(out / 'best.pth')
    weights = ckpt['ema'] if ckpt['best_weights'] == 'ema' else ckpt['model']
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # Either set of weights on request.
    ema = mambazoo.load_model(out / 'best.pth', use_ema=True).state_dict()
    trained = mambazoo.load_model(out / 'best.pth', use_ema=False).state_dict()
    assert all(torch.equal(ema[k], ckpt['ema'][k]) and torch.equal(trained[k], ckpt['model'][k]) for k in ema)
    # create_model with the name takes the recorded arguments as its defaults; explicit ones win.
    named = mambazoo.create_model('mambavision_tiny', checkpoint_path=out / 'best.pth')
    assert named.in_chans == 1 and named.pretrained_cfg['input_size'] == (1, 32, 32)
    assert mambazoo.create_model('mambavision_tiny', checkpoint_path=out / 'best.pth',
                                 drop_path_rate=0.3).num_classes == 10


def test_the_eval_transform_is_the_trainers(run):
    """The transform every command builds from the loaded model is the one the trainer validated with."""
    out, result = run
    from mambazoo.data.loader import build_data
    config = load_training_state(out / 'best.pth')['config']
    trainer_view = build_data(config).test.transform
    model = mambazoo.load_model(out / 'best.pth')
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (45, 37, 3), dtype=np.uint8))
    assert torch.equal(build_eval_transform(model)(image), trainer_view(image))
    assert eval_data_config(model)['input_size'] == (1, 32, 32)


def test_every_command_takes_the_checkpoint_alone(run, photos, tmp_path, capsys):
    out, _ = run
    best = str(out / 'best.pth')
    assert main(['predict', *map(str, photos), '--checkpoint', best, '--topk', '2', '--json']) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed['model'] == 'mambavision_tiny'
    assert all(t['label'] in DIGITS for r in printed['results'] for t in r['top'])
    assert main(['validate', '--checkpoint', best, '--data', 'digits']) == 0
    assert 'mambavision_tiny on digits (359 images)' in capsys.readouterr().out
    assert main(['export', '--checkpoint', best, '--format', 'onnx', '--out', str(tmp_path / 'm.onnx'),
                 '--verify']) == 0
    assert 'verify: max abs difference' in capsys.readouterr().out
    assert main(['flops', '--checkpoint', best]) == 0
    assert 'at 32x32' in capsys.readouterr().out
    assert main(['summary', '--checkpoint', best]) == 0
    assert 'input 1x1x32x32' in capsys.readouterr().out
    assert main(['benchmark', '--checkpoint', best, '--batch-size', '2', '--iters', '1', '--warmup', '0',
                 '--no-latency', '--json']) == 0
    assert json.loads(capsys.readouterr().out)['results'][0]['model'] == 'mambavision_tiny'
    assert main(['analyze', 'activations', '--checkpoint', best, '--data', str(photos[0]),
                 '--out', str(tmp_path / 'act.png')]) == 0
    assert (tmp_path / 'act.png').is_file()


def test_exported_folder_is_a_model_file(run, tmp_path):
    out, _ = run
    folder = tmp_path / 'folder'
    assert main(['export', '--checkpoint', str(out / 'best.pth'), '--format', 'folder', '--out', str(folder)]) == 0
    model, again = mambazoo.load_model(out / 'best.pth'), mambazoo.load_model(folder)
    assert class_names(again) == DIGITS and again.pretrained_cfg['input_size'] == (1, 32, 32)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_checkpoint_of_an_earlier_trainer_version(run, tmp_path):
    """Before records, the trainer saved 'arch', 'config', 'num_classes', 'in_chans' and 'classes'."""
    out, _ = run
    ckpt = load_training_state(out / 'last.pth')
    ckpt.pop('mambazoo_model')
    ckpt.update(arch='mambavision_tiny', num_classes=10, in_chans=1, classes=DIGITS)
    torch.save(ckpt, tmp_path / 'old.pth')
    model = mambazoo.load_model(tmp_path / 'old.pth')
    assert class_names(model) == DIGITS and model.pretrained_cfg['input_size'] == (1, 32, 32)
    assert model.pretrained_cfg['interpolation'] == 'bilinear' and model.pretrained_cfg['crop_pct'] == 1.0


def test_a_file_without_a_record_says_how_to_name_the_model(tmp_path):
    torch.save({'state_dict': mambazoo.create_model('hybrid_tiny').state_dict()}, tmp_path / 'plain.pth')
    with pytest.raises(CheckpointError, match='does not record which model'):
        mambazoo.load_model(tmp_path / 'plain.pth')
    assert mambazoo.create_model('hybrid_tiny', checkpoint_path=tmp_path / 'plain.pth').num_classes == 10


def test_vmamba_release_file_with_a_yacs_config_loads_without_trusted(tmp_path, monkeypatch):
    """VMamba's .pth files pickle their yacs CfgNode beside the weights: read as a plain dict, no code run."""
    yacs, config = types.ModuleType('yacs'), types.ModuleType('yacs.config')

    class CfgNode(dict):  # what yacs' CfgNode pickles as: a dict subclass with attributes
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__dict__['__immutable__'] = False
    CfgNode.__module__, CfgNode.__qualname__ = 'yacs.config', 'CfgNode'
    config.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, 'yacs', yacs)
    monkeypatch.setitem(sys.modules, 'yacs.config', config)
    kwargs = dict(depths=[1, 1, 1, 1], dims=16)
    model = mambazoo.create_model('vmamba_tiny', **kwargs)
    release = CfgNode(MODEL=CfgNode(TYPE='vssm', NAME='vssm1_tiny_0230s', NUM_CLASSES=1000))
    torch.save({'model': model.state_dict(), 'config': release, 'epoch': 299}, tmp_path / 'vssm1_tiny.pth')
    monkeypatch.delitem(sys.modules, 'yacs.config')  # no yacs when it is read
    monkeypatch.delitem(sys.modules, 'yacs')
    loaded = mambazoo.create_model('vmamba_tiny', checkpoint_path=tmp_path / 'vssm1_tiny.pth', **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    # The config names the model (an official alias of ours): the file alone says what to build, with the
    # family's published cfg (`mambazoo validate --checkpoint vssm1_tiny_....pth` needs no --model).
    record = read_model_record(tmp_path / 'vssm1_tiny.pth')
    assert record['name'] == 'vmamba_tiny' and record['args'] == {'num_classes': 1000} and record['release']
    from mambazoo.models.model_file import recorded_cfg
    assert recorded_cfg(record) == {}


class Payload:
    """A harmless custom class: the safe loader still refuses it (unpickling a class could run code)."""


def test_safe_loader_names_the_refused_class_and_trusted_loads_it(tmp_path):
    state = mambazoo.create_model('hybrid_tiny').state_dict()
    torch.save({'state_dict': state, 'extra': Payload()}, tmp_path / 'custom.pth')
    with pytest.raises(CheckpointError, match=r'Payload.*trusted=True \(command line: --trusted\)'):
        read_checkpoint(tmp_path / 'custom.pth')
    assert read_checkpoint(tmp_path / 'custom.pth', trusted=True).keys() == state.keys()
    assert mambazoo.create_model('hybrid_tiny', checkpoint_path=tmp_path / 'custom.pth', trusted=True)
