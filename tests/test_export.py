"""Export (``mambazoo.export`` and ``mambazoo export``): ONNX run by ONNX Runtime, TorchScript, the shareable folder,
and torch.compile, for a small configuration of every family, checked on real photographs (scikit-image's).

The classifier of each small model is re-drawn with unit-scale weights so that logits are O(0.1) to O(10): with the
default 0.02-scale head a 1e-4 tolerance on logits of ~1e-3 would hide errors in the backbone.
"""
import json
import math
import shutil
import warnings

import pytest
import torch

import mambazoo
from mambazoo import export
from mambazoo.cli import main

TOL = 1e-4

# name -> (model kwargs, image size): a few blocks, input sizes every family accepts, sequences longer than 1.
# MambaVision pads each map to its window: small windows keep its scans short (16 and 4 tokens here), which is
# cheap to run (torch.compile sees the scan as one custom op, mambazoo::selective_scan_chunked_inference).
FAMILIES = {
    'mambavision_tiny': (dict(dim=8, in_dim=4, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=[8, 8, 4, 2],
                              num_classes=10), 64),
    'vim_tiny': (dict(embed_dim=16, depth=2, num_classes=10, img_size=64), 64),
    'vmamba_tiny': (dict(dims=8, depths=[1, 1, 1, 1], num_classes=10), 32),
    'mambaout_femto': (dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], num_classes=10), 32),
    'hybrid_tiny': (dict(embed_dim=16, depth=2, num_heads=2, num_classes=10, img_size=64), 64),
}
# torch's ONNX exporter spends 30-70 s on VMamba with a dynamic batch on a 2-core machine (symbolic shape work in
# its cross scan and reshapes; ~4x less with a static batch).
SLOW_ONNX = {'vmamba_tiny'}

pytest.importorskip('skimage.data')
# The exports rely on 'auto' choosing the loop-free scan while tracing: every test runs under 'auto'.
pytestmark = pytest.mark.usefixtures('auto_scan_backend')


def family_params(slow=frozenset()):
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in FAMILIES]


def build(name, seed=0):
    kwargs, _ = FAMILIES[name]
    torch.manual_seed(seed)
    model = mambazoo.create_model(name, **kwargs).eval()
    torch.nn.init.normal_(model.get_classifier().weight, std=1.0)
    return model


def photos(model, size):
    """A batch of 3 real photographs, preprocessed for ``model``: astronaut, chelsea (a cat), coffee."""
    return torch.cat([export.reference_image(model, size, photo) for photo in ('astronaut', 'chelsea', 'coffee')])


def eager(model, x):
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------------------------- ONNX

@pytest.mark.parametrize('name', family_params(SLOW_ONNX))
def test_onnx_runtime_matches_pytorch_on_real_images_at_batch_1_and_3(name, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    model = build(name)
    size = FAMILIES[name][1]
    path = export.export_onnx(model, tmp_path / f'{name}.onnx', img_size=size, dynamic_batch=True)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ('image', 'logits')
    assert isinstance(inp.shape[0], str), f'batch dimension is not symbolic: {inp.shape}'
    x3 = photos(model, size)
    for x in (x3[:1], x3):  # one file, two batch sizes
        got = torch.from_numpy(session.run(None, {'image': x.numpy()})[0])
        expected = eager(model, x)
        assert got.shape == expected.shape == (len(x), 10)
        assert expected.abs().max() > 0.1, 'logits too small for the tolerance to mean anything'
        assert (got - expected).abs().max().item() <= TOL
    assert export.verify_onnx(path, model, x3) <= TOL


def test_onnx_graph_grows_with_log_of_sequence_length(tmp_path):
    """The same one-block Mamba model at 4 and 256 tokens: the scan adds a few nodes per doubling of the sequence
    (a log-depth scan), where a loop over time steps would add several nodes per step."""
    onnx = pytest.importorskip('onnx')
    torch.manual_seed(0)
    model = mambazoo.create_model('hybrid_tiny', embed_dim=16, depth=1, mamba_ratio=1.0, num_heads=2,
                                  num_classes=10).eval()
    counts = {}
    for size in (32, 256):  # patch 16: 2x2 = 4 and 16x16 = 256 tokens
        path = export.export_onnx(model, tmp_path / f'{size}.onnx', img_size=size)
        graph = onnx.load(str(path)).graph
        counts[(size // 16) ** 2] = len(graph.node)
        assert not {'Loop', 'Scan'} & {node.op_type for node in graph.node}
        assert export.verify_onnx(path, model, export.reference_image(model, size)) <= TOL
    doublings = math.log2(256 / 4)
    growth = counts[256] - counts[4]
    assert growth <= 16 * doublings, f'{counts}: more than 16 nodes per doubling of the sequence'
    assert growth < (256 - 4) / 2, f'{counts}: the graph grows with the sequence length'


# ----------------------------------------------------------------------------------------------- TorchScript

@pytest.mark.parametrize('name', family_params())
def test_torchscript_trace_round_trip(name, tmp_path):
    model = build(name)
    size = FAMILIES[name][1]
    path = export.export_torchscript(model, tmp_path / f'{name}.pt', img_size=size)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.load is deprecated
        loaded = torch.jit.load(str(path))
    x3 = photos(model, size)
    with torch.no_grad():
        for x in (x3[:1], x3):  # traced at batch 1
            assert (loaded(x) - eager(model, x)).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------- folder

@pytest.mark.parametrize('name', family_params())
def test_folder_round_trip_through_create_model(name, tmp_path):
    kwargs, size = FAMILIES[name]
    model = build(name)
    folder = export.export_folder(model, tmp_path / name, name, model_args=kwargs)
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == name and config['num_classes'] == 10
    expected_args = dict(kwargs)
    if 'img_size' in kwargs:  # timm records the input size as (height, width)
        expected_args['img_size'] = [kwargs['img_size']] * 2
    assert {k: config['model_args'][k] for k in kwargs} == expected_args
    cfg = config['pretrained_cfg']
    assert cfg['mean'] == list(model.pretrained_cfg['mean']) and cfg['std'] == list(model.pretrained_cfg['std'])
    assert len(cfg['input_size']) == 3

    # The folder's config.json supplies the model arguments: the name and the folder are enough.
    reloaded = mambazoo.create_model(name, checkpoint_path=folder).eval()
    original, again = model.state_dict(), reloaded.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    x = photos(model, size)
    assert torch.equal(eager(reloaded, x), eager(model, x))
    assert torch.equal(eager(export.load_from_folder(folder).eval(), x), eager(model, x))


def test_folder_of_a_default_model_loads_with_just_the_name(tmp_path):
    torch.manual_seed(0)
    model = mambazoo.create_model('hybrid_tiny').eval()
    folder = export.export_folder(model, tmp_path / 'hybrid', 'hybrid_tiny', img_size=160)
    assert json.loads((folder / 'config.json').read_text())['pretrained_cfg']['input_size'] == [3, 160, 160]
    reloaded = mambazoo.create_model('hybrid_tiny', checkpoint_path=folder).eval()
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    x = export.reference_image(model)  # the default input size, 224
    assert x.shape == (1, 3, 224, 224)
    assert torch.equal(eager(reloaded, x), eager(model, x))


def test_folder_rejects_what_json_cannot_hold(tmp_path):
    model = build('mambaout_femto')
    with pytest.raises(ValueError, match='JSON'):
        export.export_folder(model, tmp_path / 'f', 'mambaout_femto', model_args={'act_layer': torch.nn.GELU})


# ----------------------------------------------------------------------------------------------- CLI

MAMBAOUT_ARGS = ['--model', 'mambaout_femto', '--model-kwargs', 'depths=[1,1,1,1]', 'dims=[8,16,24,32]',
                 '--num-classes', '10', '--img-size', '32']


@pytest.mark.parametrize('fmt,out', [('onnx', 'm.onnx'), ('torchscript', 'm.pt'), ('folder', 'm')])
def test_cli_export_with_verify(fmt, out, tmp_path, capsys):
    if fmt == 'onnx':
        pytest.importorskip('onnxruntime')
    extra = ['--dynamic-batch', '--no-optimize'] if fmt == 'onnx' else []  # export_onnx's tests run the optimiser
    code = main(['export', *MAMBAOUT_ARGS, '--format', fmt, '--out', str(tmp_path / out), '--verify', *extra])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert (tmp_path / out).exists()
    diff = float(printed.split('verify: max abs difference')[1].split(':')[-1])
    assert 0 <= diff <= TOL


def test_cli_export_reports_bad_input(tmp_path, capsys):
    code = main(['export', '--model', 'mambavision_tiny', '--model-kwargs', 'dim=8', 'in_dim=4',
                 'depths=[1,1,1,1]', 'num_heads=[1,1,2,2]', '--format', 'torchscript', '--out',
                 str(tmp_path / 'x.pt'), '--img-size', '48'])
    assert code == 2 and 'divisible by 32' in capsys.readouterr().err
    assert main(['export', '--model', 'no_such_model', '--format', 'onnx', '--out', str(tmp_path / 'x')]) == 2
    assert 'Unknown model' in capsys.readouterr().err
    assert main(['export', *MAMBAOUT_ARGS, '--format', 'folder', '--out', str(tmp_path / 'f'),
                 '--dynamic-batch']) == 2
    assert '--dynamic-batch' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- torch.compile

@pytest.mark.slow
@pytest.mark.parametrize('name', family_params())
def test_torch_compile_inductor_matches_eager(name):
    if not (shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')):
        pytest.skip('the inductor CPU backend needs a C++ compiler')
    model = build(name)
    x = photos(model, FAMILIES[name][1])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='inductor', fullgraph=True)  # no graph break, the scan included
    got = eager(compiled, x)
    assert (got - eager(model, x)).abs().max().item() <= TOL


def test_folder_with_a_corrupt_config_is_a_clear_error(tmp_path):
    model = build('mambaout_femto')
    folder = export.export_folder(model, tmp_path / 'femto', 'mambaout_femto')
    (folder / 'config.json').write_text('{"model_args": ')
    with pytest.raises(mambazoo.CheckpointError, match='config.json'):
        mambazoo.create_model('mambaout_femto', checkpoint_path=folder)
