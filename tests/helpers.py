"""Helpers shared by the test files: ``from helpers import rel_err, images, ...``.

tests/ is a plain folder (no ``__init__.py``); tests/conftest.py puts it on ``sys.path`` so that every test file
imports this module whatever pytest's import mode. Fixtures (``set_policy``, ``auto_scan_backend``) live in
tests/conftest.py; plain functions and constants live here.

Golden fixtures (``../shared/fixtures`` beside the project root, described in its README) are read only through
``require_fixture`` and the functions built on it. Where one is missing the test is skipped with the reason, except
when the environment says ``CI=true``: then it fails, because CI runs a fresh clone with ../shared beside it and a CI
run must never pass without the fixtures.
"""
import copy
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = PROJECT_ROOT.parent / 'shared' / 'fixtures'

# A small MambaVision (0.15M parameters) for the commands' tests: as keyword arguments, as `--model-kwargs` words,
# and as a recipe's `model.kwargs` (with windows that fit 32 px images).
TINY_MAMBAVISION = dict(dim=8, in_dim=4, depths=[1, 1, 2, 2], num_heads=[1, 1, 2, 2])
TINY_MAMBAVISION_ARGS = ['--model-kwargs', 'dim=8', 'in_dim=4', 'depths=[1,1,2,2]', 'num_heads=[1,1,2,2]']
TINY_MAMBAVISION_YAML = '{dim: 8, in_dim: 4, depths: [1,1,2,2], num_heads: [1,1,2,2], window_size: [8,8,2,1]}'
# `--set` overrides that train it on 32 px images in one quiet thread.
TINY_TRAIN_SETS = [f'model.kwargs={TINY_MAMBAVISION_YAML}', 'data.img_size=32', 'data.batch_size=8',
                   'train.progress=false', 'train.tensorboard=false', 'train.plots=false', 'train.threads=1']
# The detection/segmentation trainer's tiny settings: a small MambaVision backbone, digits pasted on 64 px canvases.
TINY_DOWNSTREAM_SETS = [
    'model.kwargs={dim: 16, in_dim: 8, depths: [1, 1, 1, 1], num_heads: [1, 2, 2, 2], window_size: [8, 8, 4, 2]}',
    'data.batch_size=4', 'data.eval_batch_size=8', 'train.threads=1', 'train.progress=false',
    'downstream.source=digits', 'downstream.canvas_size=64', 'downstream.item_size=[16, 32]',
    'downstream.anchor_sizes=[8, 16, 32, 64, 128]', 'downstream.fpn_channels=16', 'downstream.box_head_dim=32',
    'downstream.mask_head_dim=8', 'downstream.seg_head_channels=16', 'downstream.train_size=200',
    'downstream.val_size=8',
]


# ------------------------------------------------------------------------------------------ golden fixtures

def in_ci() -> bool:
    """True where the environment says ``CI=true`` (GitHub Actions and most CI services set it)."""
    return os.environ.get('CI', '').strip().lower() in ('true', '1', 'yes')


def require_fixture(path) -> Path:
    """``path`` (a fixture file or folder) if it exists; otherwise fails the test under ``CI=true`` and skips it,
    with the reason, everywhere else."""
    path = Path(path)
    if path.exists():
        return path
    reason = f'golden fixture {path} is missing (fixtures live in ../shared/fixtures beside the project root)'
    if in_ci():
        pytest.fail(f'{reason}; CI=true: a CI run must not pass without them', pytrace=False)
    pytest.skip(reason)


def fixture_path(*parts: str) -> Path:
    """``SHARED_FIXTURES / part / ...``, required (see ``require_fixture``)."""
    return require_fixture(SHARED_FIXTURES.joinpath(*parts))


def read_fixture_json(*parts: str) -> dict:
    return json.loads(fixture_path(*parts).read_text())


def fixture_names(family: str, prefix: str, suffix: str = '.json') -> set:
    """The names ``X`` of the files ``{prefix}X{suffix}`` in a family's fixture folder; none found is a missing
    fixture (see ``require_fixture``)."""
    folder = fixture_path(family)
    names = {p.name[len(prefix):-len(suffix)] for p in folder.glob(f'{prefix}*{suffix}')}
    if not names:
        require_fixture(folder / f'{prefix}*{suffix}')
    return names


def load_golden(family: str, name: str, model_cls) -> tuple:
    """A golden fixture ``{family}/{name}.json`` + ``.safetensors``: (its json, its tensors, the official state dict
    (the ``param.*`` tensors without the prefix), a ``model_cls`` built from the json's kwargs with that state loaded
    strictly, in eval mode)."""
    from safetensors.torch import load_file
    meta = read_fixture_json(family, f'{name}.json')
    tensors = load_file(str(fixture_path(family, f'{name}.safetensors')))
    state = {k[len('param.'):]: v for k, v in tensors.items() if k.startswith('param.')}
    torch.manual_seed(0)
    model = model_cls(**meta['kwargs'])
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return meta, tensors, state, model.eval()


def golden_fixture(family: str, model_cls, names):
    """A module-scoped fixture over the goldens ``names`` of a family: (name, json, tensors, model), the model as
    ``load_golden`` gives it. Use as ``golden = golden_fixture('vim', VisionMamba, GOLDENS)``."""
    @pytest.fixture(scope='module', params=names)
    def golden(request):
        meta, tensors, _, model = load_golden(family, request.param, model_cls)
        return request.param, meta, tensors, model
    return golden


def float64_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits of a float64 copy of ``model`` on ``x`` (in float64), without gradients."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model64(x.double())
    assert logits.dtype == torch.float64
    return logits


def assert_alias_builds_same_architecture(alias: str, name: str, model_cls) -> None:
    """An official alias builds (on the meta device) the same ``model_cls`` as our name: same architecture in its
    pretrained config, same state-dict keys and shapes, same repr."""
    a, b = meta_model(alias), meta_model(name)
    assert type(a) is model_cls and type(b) is model_cls
    assert a.pretrained_cfg['architecture'] == b.pretrained_cfg['architecture'] == name
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert repr(a) == repr(b)


def assert_official_keys(model: torch.nn.Module, key_list: dict, name: str, ordered: bool = False) -> None:
    """``model.state_dict()`` has exactly the keys and shapes of an official key list (``{"keys": [[key, shape,
    dtype], ...]}``), and with ``ordered`` in the official order too."""
    want = {k: tuple(shape) for k, shape, _ in key_list['keys']}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f'{name}: missing {missing[:10]}, unexpected {extra[:10]}'
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, f'{name}: shapes (ours, official) differ: {dict(list(wrong.items())[:10])}'
    if ordered:
        assert list(got) == list(want), f'{name}: key order differs from the official one'


# ----------------------------------------------------------------------------------------- models and data

def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error ``|got - want| / |want|``, in float64; the shapes must match."""
    assert got.shape == want.shape, f'shape {tuple(got.shape)} vs expected {tuple(want.shape)}'
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm()).item()


def images(*shape, seed: int = 1) -> torch.Tensor:
    """A standard normal tensor of ``shape`` from its own generator (the global RNG is left alone)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def model_factory(cls, defaults: dict):
    """``build(seed=0, **overrides)``: ``cls(**defaults)`` with ``overrides`` applied, initialised after
    ``torch.manual_seed(seed)`` so that the same seed gives the same weights."""
    def build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return cls(**dict(defaults, **overrides))
    return build


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its initial value (norm weights 1, zero biases, layer scales, D, A_log ...) by
    ``scale`` N(0, 1), so that none is a no-op and a misplaced one changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@functools.lru_cache(maxsize=None)
def meta_model(name: str, **kwargs) -> torch.nn.Module:
    """A full-size registered model built on the meta device (no memory, no init cost), cached across tests."""
    import mambazoo
    with torch.device('meta'):
        return mambazoo.create_model(name, **kwargs)


def output_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple:
    """(output, {parameter name: gradient}) of one backward pass of a fixed random projection of ``model(x)``,
    from fresh gradients (a plain sum of the logits would hide what a train-mode BatchNorm cancels)."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * images(*out.shape, seed=7)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close_by_name(got: dict, want: dict) -> None:
    """``torch.testing.assert_close`` on every entry of ``want`` (e.g. gradients by parameter name), naming it."""
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, name=name: f'{name}: {m}')


def assert_every_parameter_has_a_gradient(model: torch.nn.Module) -> None:
    """After a backward pass: every parameter has a gradient, finite and not all zero."""
    params = dict(model.named_parameters())
    none = [n for n, p in params.items() if p.grad is None]
    zero = [n for n, p in params.items() if p.grad is not None and not p.grad.abs().sum() > 0]
    nonfinite = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not none and not zero and not nonfinite, \
        f'no gradient: {none}, all-zero gradient: {zero}, non-finite gradient: {nonfinite}'


def record_outputs(modules, fn) -> tuple:
    """``fn()`` with forward hooks on ``modules``: (its result, [(index in ``modules``, output), ...] in the order the
    modules ran); the hooks are removed afterwards."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: seen.append((i, out))) for i, m in enumerate(modules)]
    try:
        result = fn()
    finally:
        for hook in hooks:
            hook.remove()
    return result, seen


def spy(monkeypatch, owner, name: str, record=lambda *args, **kwargs: None) -> list:
    """Wrap ``owner.name`` for one test: each call appends ``record(*args, **kwargs)`` to the returned list, then
    runs the real function."""
    calls = []
    real = getattr(owner, name)

    def spying(*args, **kwargs):
        calls.append(record(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spying)
    return calls


def run_cli(args: list, capsys) -> tuple:
    """``mambazoo <args>`` run in this process: (exit code, stdout, stderr)."""
    from mambazoo.cli import main
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def skimage_photos(*names: str) -> list:
    """Paths of photographs bundled with scikit-image (``'chelsea.png'`` ...); skips the test without it."""
    skdata = pytest.importorskip('skimage.data')
    folder = Path(skdata.__file__).parent
    return [folder / name for name in names]


def _png(path: Path, value: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(value + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_image_folder(root: Path, per_class: int = 6, bad: bool = True) -> dict:
    """root/{train,val}/{dark,light}/*.png, 32x32 (learnable: dark vs light); with ``bad``, each split also holds a
    truncated PNG, a text file named .jpg and an empty .png. Returns {split: sorted bad paths}."""
    bad_files = {}
    for s, split in enumerate(('train', 'val')):
        for c, (name, value) in enumerate((('dark', 50), ('light', 200))):
            for i in range(per_class):
                _png(root / split / name / f'{i:02d}.png', value, seed=1000 * s + 100 * c + i)
        if bad:
            truncated = root / split / 'dark' / '03_truncated.png'
            _png(truncated, 50, seed=99)
            data = truncated.read_bytes()
            truncated.write_bytes(data[:len(data) // 2])
            text = root / split / 'light' / '01_text.jpg'
            text.write_text('this is not a JPEG\n')
            empty = root / split / 'light' / '04_empty.png'
            empty.write_bytes(b'')
            bad_files[split] = sorted(str(p) for p in (truncated, text, empty))
    return bad_files
