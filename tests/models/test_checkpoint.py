"""Reading and loading checkpoints: every release format, the offline Hugging Face cache, torch hub's checkpoint
cache (weights named by url), wrong variants, another number of classes, corrupt files and non-strict loading.

Every load is checked by its outputs: the loaded model must give the source model's logits on a fixed input.
The source model's weights (and BatchNorm statistics) are perturbed away from the initialisation, and each
target model is built from another seed and checked to differ from the source before loading, so a loader
that silently skips tensors fails these tests. The network is never used: HF_HUB_OFFLINE is set for every
test and huggingface_hub's download function (and, where a test needs it, torch.hub's) is replaced by one that
records the call and refuses.
"""
import argparse
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

import mambazoo
from mambazoo import CheckpointError, CheckpointMismatchError
from mambazoo.models._builder import resolve_pretrained_file

SMALL = dict(dim=8, in_dim=4, depths=[1, 1, 2, 2], num_heads=[1, 1, 2, 2], num_classes=10)
NAME = 'mambavision_tiny'
HF_REPO, HF_FILE = 'nvidia/MambaVision-T-1K', 'mambavision_tiny_1k.pth.tar'
LOGGER = 'mambazoo.models._builder'
FALLBACK_MSG = 'weights_only=False'  # no load may fall back to torch's unsafe unpickler


# ----------------------------------------------------------------------------------------------- helpers

def build(seed, **overrides):
    torch.manual_seed(seed)
    return mambazoo.create_model(NAME, **dict(SMALL, **overrides)).eval()


def perturb(model, seed, scale=0.05):
    """Move every float tensor of the state (parameters and BatchNorm statistics) away from its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if key.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.add_(scale * torch.randn(t.shape, generator=gen))
    return model


@torch.no_grad()
def logits(model, x):
    return model.eval()(x)


@torch.no_grad()
def pooled_features(model, x):
    return model.eval().forward_head(model.forward_features(x), pre_logits=True)


def differs(a, b):
    return not torch.allclose(a, b, rtol=1e-3, atol=1e-4)


def contiguous(sd):
    return {k: v.contiguous().clone() for k, v in sd.items()}


def fallback_warnings(caplog):
    return [r for r in caplog.records if r.name == LOGGER and FALLBACK_MSG in r.getMessage()]


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def offline(no_downloads):
    """No test of this file may reach the network or the user's caches (tests/conftest.py)."""
    return no_downloads


@pytest.fixture(scope='module')
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope='module')
def source(x):
    """(model, its state dict, its logits): a 10-class model with perturbed weights."""
    model = perturb(build(0), seed=100)
    out = logits(model, x)
    assert torch.isfinite(out).all()
    return model, contiguous(model.state_dict()), out


@pytest.fixture(scope='module')
def ema(x, source):
    """(EMA state dict, its logits): another set of weights, evaluated with torch's own load_state_dict."""
    model = perturb(build(0), seed=200)
    model.load_state_dict(source[0].state_dict())
    perturb(model, seed=300, scale=0.02)
    out = logits(model, x)
    assert differs(out, source[2])
    return contiguous(model.state_dict()), out


@pytest.fixture(scope='module')
def fresh_logits(x):
    return logits(build(1), x)


# ----------------------------------------------------------------------------------------------- 1. formats

def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def w_plain_pth(d, sd, ema_sd):
    torch.save(sd, d / 'weights.pth')
    return d / 'weights.pth'


def w_plain_bin(d, sd, ema_sd):
    torch.save(sd, d / 'pytorch_model.bin')
    return d / 'pytorch_model.bin'


def w_official_tar(d, sd, ema_sd):
    args = argparse.Namespace(model='mamba_vision_T', lr=5e-4, epochs=300, amp=True)
    torch.save({'state_dict': sd, 'epoch': 309, 'args': args, 'metric': 82.3}, d / HF_FILE)
    return d / HF_FILE


def w_model_key(d, sd, ema_sd):
    torch.save({'model': sd, 'epoch': 3}, d / 'ckpt.pth')
    return d / 'ckpt.pth'


def w_model_and_ema(d, sd, ema_sd):
    torch.save({'model': sd, 'model_ema': ema_sd}, d / 'ckpt_ema.pth')
    return d / 'ckpt_ema.pth'


def w_state_dict_and_ema(d, sd, ema_sd):
    torch.save({'state_dict': sd, 'state_dict_ema': ema_sd, 'epoch': 5}, d / 'ckpt_sd_ema.pth.tar')
    return d / 'ckpt_sd_ema.pth.tar'


def w_ddp(d, sd, ema_sd):
    torch.save(_prefixed(sd, 'module.'), d / 'ddp.pth')
    return d / 'ddp.pth'


def w_ddp_wrapped(d, sd, ema_sd):
    torch.save({'state_dict': _prefixed(sd, 'module.'), 'epoch': 1}, d / 'ddp_wrapped.pth')
    return d / 'ddp_wrapped.pth'


def w_ddp_ema(d, sd, ema_sd):
    torch.save({'model': _prefixed(sd, 'module.'), 'model_ema': _prefixed(ema_sd, 'module.')}, d / 'ddp_ema.pth')
    return d / 'ddp_ema.pth'


def w_safetensors(d, sd, ema_sd):
    save_file(sd, str(d / 'weights.safetensors'))
    return d / 'weights.safetensors'


def w_hf_folder(d, sd, ema_sd):
    folder = d / 'MambaVision-T-1K'
    folder.mkdir()
    (folder / 'config.json').write_text('{"architectures": ["MambaVision"]}')
    save_file(sd, str(folder / 'model.safetensors'))
    return folder


def w_hf_folder_bin(d, sd, ema_sd):
    folder = d / 'hf_bin'
    folder.mkdir()
    torch.save(sd, folder / 'pytorch_model.bin')
    return folder


def w_folder_official_tar(d, sd, ema_sd):
    folder = d / 'snapshot'
    folder.mkdir()
    w_official_tar(folder, sd, ema_sd)
    (folder / 'README.md').write_text('weights')
    return folder


def w_hf_export_prefixed(d, sd, ema_sd):
    """A Hugging Face transformers export: MambaVisionModel keeps the network under `model.`."""
    folder = d / 'hf_export'
    folder.mkdir()
    save_file(_prefixed(sd, 'model.'), str(folder / 'model.safetensors'))
    return folder


# (writer, use_ema, which weights must come out, whether the unsafe-pickle fallback warning is expected)
FORMATS = {
    'plain_pth': (w_plain_pth, False, 'src', False),
    'plain_bin': (w_plain_bin, False, 'src', False),
    'official_pth_tar_namespace': (w_official_tar, False, 'src', True),
    'model_key': (w_model_key, False, 'src', False),
    'model_and_ema_use_ema': (w_model_and_ema, True, 'ema', False),
    'model_and_ema_no_ema': (w_model_and_ema, False, 'src', False),
    'state_dict_and_ema_use_ema': (w_state_dict_and_ema, True, 'ema', False),
    'ddp_prefix': (w_ddp, False, 'src', False),
    'ddp_prefix_wrapped': (w_ddp_wrapped, False, 'src', False),
    'ddp_prefix_ema': (w_ddp_ema, True, 'ema', False),
    'safetensors': (w_safetensors, False, 'src', False),
    'hf_folder_safetensors': (w_hf_folder, False, 'src', False),
    'hf_folder_bin': (w_hf_folder_bin, False, 'src', False),
    'folder_official_pth_tar': (w_folder_official_tar, False, 'src', True),
}


@pytest.mark.parametrize('fmt', list(FORMATS))
def test_load_checkpoint_round_trip(fmt, tmp_path, x, source, ema, fresh_logits, caplog):
    writer, use_ema, want, expect_fallback = FORMATS[fmt]
    path = writer(tmp_path, source[1], ema[0])
    expected = ema[1] if want == 'ema' else source[2]
    target = build(1)
    assert differs(logits(target, x), expected)

    caplog.set_level(logging.WARNING, logger=LOGGER)
    returned = mambazoo.load_checkpoint(target, path, use_ema=use_ema)
    assert returned is target
    torch.testing.assert_close(logits(target, x), expected)
    assert not fallback_warnings(caplog), caplog.text

    # read_checkpoint gives the plain state dict: our keys, tensors equal to the chosen weights
    state = mambazoo.read_checkpoint(path, use_ema=use_ema)
    want_sd = ema[0] if want == 'ema' else source[1]
    assert set(state) == set(want_sd)
    for k, v in want_sd.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize('fmt', [f for f, spec in FORMATS.items() if not spec[1]] + ['hf_export_prefixed'])
def test_create_model_checkpoint_path_round_trip(fmt, tmp_path, x, source, fresh_logits, caplog):
    writer, _, _, expect_fallback = FORMATS.get(fmt, (w_hf_export_prefixed, False, 'src', False))
    path = writer(tmp_path, source[1], None)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = build(1, checkpoint_path=path)
    assert differs(fresh_logits, source[2])  # the same seed without the checkpoint gives other logits
    torch.testing.assert_close(logits(model, x), source[2])
    assert not fallback_warnings(caplog), caplog.text
    if fmt in ('plain_pth', 'hf_folder_safetensors'):  # str paths work as well as Path objects
        torch.testing.assert_close(logits(build(1, checkpoint_path=str(path)), x), source[2])


def test_load_checkpoint_hf_export_prefixed(tmp_path, x, source):
    path = w_hf_export_prefixed(tmp_path, source[1], None)
    target = build(1)
    mambazoo.load_checkpoint(target, path)
    torch.testing.assert_close(logits(target, x), source[2])


class _Gadget:
    """An arbitrary Python object: unpickling such things can run code, so it needs trusted=True."""

    def __init__(self, value):
        self.value = value


def test_arbitrary_python_objects_need_trusted(tmp_path, x, source):
    path = tmp_path / 'with_object.pth.tar'
    torch.save({'state_dict': source[1], 'extra': _Gadget(3)}, path)
    target = build(1)
    with pytest.raises(CheckpointError, match='trusted=True') as info:
        mambazoo.load_checkpoint(target, path)
    assert str(path) in str(info.value)
    mambazoo.load_checkpoint(target, path, trusted=True)
    torch.testing.assert_close(logits(target, x), source[2])


def test_load_checkpoint_from_in_memory_dict(x, source):
    target = build(1)
    mambazoo.load_checkpoint(target, {'state_dict': _prefixed(source[1], 'module.')})
    torch.testing.assert_close(logits(target, x), source[2])


def test_use_ema_without_ema_weights_raises(tmp_path, source):
    path = w_model_key(tmp_path, source[1], None)
    with pytest.raises(CheckpointError, match='EMA'):
        mambazoo.load_checkpoint(build(1), path, use_ema=True)


# ----------------------------------------------------------------------------------------------- 2. HF cache

COMMIT = '0123456789abcdef0123456789abcdef01234567'


def make_hf_cache(root, payload_writer):
    """The huggingface_hub cache layout: blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/main."""
    repo = root / ('models--' + HF_REPO.replace('/', '--'))
    (repo / 'blobs').mkdir(parents=True)
    (repo / 'refs').mkdir()
    snap = repo / 'snapshots' / COMMIT
    snap.mkdir(parents=True)
    blob = repo / 'blobs' / 'a1b2c3d4e5f60718293a4b5c6d7e8f9012345678'
    payload_writer(blob)
    os.symlink(os.path.relpath(blob, snap), snap / HF_FILE)
    (repo / 'refs' / 'main').write_text(COMMIT)  # huggingface_hub writes the hash without a newline
    return snap / HF_FILE


@pytest.fixture
def hf_cache(tmp_path, source):
    def write(blob):
        torch.save({'state_dict': source[1], 'epoch': 309, 'args': argparse.Namespace(lr=5e-4)}, blob)
    root = tmp_path / 'hub'
    return root, make_hf_cache(root, write)


def test_resolve_pretrained_file_finds_cached_file(hf_cache, x, source):
    root, expected = hf_cache
    cfg = build(1).pretrained_cfg
    assert (cfg['hf_hub_id'], cfg['hf_hub_filename']) == (HF_REPO, HF_FILE)
    found = resolve_pretrained_file(cfg, cache_dir=str(root))
    assert found == expected and found.is_file()
    target = build(1)
    mambazoo.load_checkpoint(target, found)
    torch.testing.assert_close(logits(target, x), source[2])


def test_create_model_pretrained_uses_default_cache(hf_cache, monkeypatch, x, source):
    # huggingface_hub reads HF_HUB_CACHE at import time; the resolver looks it up in constants when called.
    import huggingface_hub.constants
    root, _ = hf_cache
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(root))
    model = build(1, pretrained=True)
    torch.testing.assert_close(logits(model, x), source[2])
    # an explicit checkpoint_path wins over the cache
    other = perturb(build(2), seed=7)
    torch.save(other.state_dict(), root / 'other.pth')
    torch.testing.assert_close(logits(build(1, pretrained=True, checkpoint_path=root / 'other.pth'), x),
                               logits(other, x))


@pytest.mark.parametrize('layout', ['no_dir', 'empty_dir', 'other_repo', 'no_exist_marker'])
def test_resolve_pretrained_file_empty_cache_offline(layout, tmp_path, offline):
    root = tmp_path / 'hub'
    if layout != 'no_dir':
        root.mkdir()
    if layout == 'other_repo':
        (root / 'models--nvidia--MambaVision-S-1K' / 'snapshots' / COMMIT).mkdir(parents=True)
    if layout == 'no_exist_marker':  # huggingface_hub's record of a file known to be absent upstream
        repo = root / 'models--nvidia--MambaVision-T-1K'
        (repo / 'refs').mkdir(parents=True)
        (repo / 'refs' / 'main').write_text(COMMIT)
        (repo / '.no_exist' / COMMIT).mkdir(parents=True)
        (repo / '.no_exist' / COMMIT / HF_FILE).write_text('')
    cfg = build(1).pretrained_cfg
    with pytest.raises(CheckpointError) as info:
        resolve_pretrained_file(cfg, cache_dir=str(root))
    msg = str(info.value)
    assert HF_REPO in msg and 'checkpoint_path' in msg and 'HF_HUB_OFFLINE' in msg
    assert not offline.calls


def test_create_model_pretrained_empty_cache_offline(offline):
    with pytest.raises(CheckpointError, match='checkpoint_path') as info:
        build(1, pretrained=True)
    assert HF_REPO in str(info.value)
    assert not offline.calls


# ----------------------------------------------------------------------------------------------- 2b. torch hub

VMAMBA, VMAMBA_SMALL = 'vmamba_tiny_s2l5', dict(dims=8, depths=[1, 1, 1, 1], num_classes=10)
VMAMBA_URL = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/vssm_tiny_0230_ckpt_epoch_262.pth'


@pytest.fixture
def torch_home(tmp_path, monkeypatch, offline):
    """A temporary TORCH_HOME; torch.hub.download_url_to_file refuses (the `offline` guard records the call)."""
    home = tmp_path / 'torch_home'
    monkeypatch.setenv('TORCH_HOME', str(home))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    return home


def vmamba_release_file(seed):
    """A small VMamba's perturbed weights in the release layout ({'model': ...}), and the model's logits."""
    torch.manual_seed(seed)
    model = perturb(mambazoo.create_model(VMAMBA, **VMAMBA_SMALL), seed=seed + 1)
    return {'model': contiguous(model.state_dict())}, model


def test_vmamba_cfgs_name_the_released_files():
    """assets/performance.md of the official repository: every v2 classification checkpoint."""
    files = {name: mambazoo.get_pretrained_cfg(name)['url'].rsplit('/', 1)[-1]
             for name in mambazoo.list_models('vmamba*') if mambazoo.get_pretrained_cfg(name).get('url')}
    assert files == {
        'vmamba_tiny': 'vssm1_tiny_0230s_ckpt_epoch_264.pth', 'vmamba_small': 'vssm_small_0229_ckpt_epoch_222.pth',
        'vmamba_base': 'vssm_base_0229_ckpt_epoch_237.pth', 'vmamba_tiny_s2l5': 'vssm_tiny_0230_ckpt_epoch_262.pth',
        'vmamba_small_s1l20': 'vssm1_small_0229s_ckpt_epoch_240.pth',
        'vmamba_base_s1l20': 'vssm1_base_0229s_ckpt_epoch_225.pth'}
    assert mambazoo.get_pretrained_cfg(VMAMBA)['url'] == VMAMBA_URL


def test_pretrained_url_found_in_torch_hub_cache(torch_home, x):
    state, model = vmamba_release_file(seed=5)
    cached = torch_home / 'hub' / 'checkpoints' / 'vssm_tiny_0230_ckpt_epoch_262.pth'
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    assert resolve_pretrained_file(mambazoo.get_pretrained_cfg(VMAMBA)) == cached
    loaded = mambazoo.create_model(VMAMBA, pretrained=True, **VMAMBA_SMALL)
    torch.testing.assert_close(logits(loaded, x), logits(model, x))
    import timm  # the same through timm's factory
    via_timm = timm.create_model(VMAMBA, pretrained=True, **VMAMBA_SMALL)
    torch.testing.assert_close(logits(via_timm, x), logits(model, x))


def test_pretrained_url_offline_names_the_path(torch_home, offline):
    with pytest.raises(CheckpointError, match='HF_HUB_OFFLINE') as info:
        mambazoo.create_model(VMAMBA, pretrained=True, **VMAMBA_SMALL)
    assert str(torch_home / 'hub' / 'checkpoints' / 'vssm_tiny_0230_ckpt_epoch_262.pth') in str(info.value)
    assert 'checkpoint_path' in str(info.value) and not offline.calls


def _online(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.delenv('HF_HUB_OFFLINE')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)


def test_pretrained_url_downloaded_into_torch_hub_cache(torch_home, monkeypatch, x):
    """Online, a missing file is fetched with torch.hub.download_url_to_file into the cache (here a fake that
    writes the weights), then loaded; the next build finds it there."""
    _online(monkeypatch)
    state, model = vmamba_release_file(seed=6)
    calls = []

    def fake_download(url, dst, *args, **kwargs):
        calls.append((url, dst))
        torch.save(state, dst)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake_download)
    loaded = mambazoo.create_model(VMAMBA, pretrained=True, **VMAMBA_SMALL)
    expected = torch_home / 'hub' / 'checkpoints' / 'vssm_tiny_0230_ckpt_epoch_262.pth'
    assert calls == [(VMAMBA_URL, str(expected))] and expected.is_file()
    torch.testing.assert_close(logits(loaded, x), logits(model, x))
    mambazoo.create_model(VMAMBA, pretrained=True, **VMAMBA_SMALL)
    assert len(calls) == 1


def test_pretrained_url_without_network_names_the_path(torch_home, monkeypatch):
    _online(monkeypatch)

    def no_network(url, dst, *args, **kwargs):
        import urllib.error
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    with pytest.raises(CheckpointError, match='name resolution') as info:
        mambazoo.create_model(VMAMBA, pretrained=True, **VMAMBA_SMALL)
    assert str(torch_home / 'hub' / 'checkpoints' / 'vssm_tiny_0230_ckpt_epoch_262.pth') in str(info.value)


# ----------------------------------------------------------------------------------------------- 3. variants

def _variant_file(tmp_path, seed, **overrides):
    model = perturb(build(seed, **overrides), seed=seed + 50)
    path = tmp_path / 'variant.pth'
    torch.save({'state_dict': model.state_dict()}, path)
    return path


def test_deeper_checkpoint_names_unexpected_and_missing_keys(tmp_path):
    # depth 3 in the last stage: blocks 0, 1 Mamba, block 2 attention; depth 2: block 0 Mamba, block 1 attention
    path = _variant_file(tmp_path, 3, depths=[1, 1, 2, 3])
    with pytest.raises(CheckpointMismatchError) as info:
        mambazoo.load_checkpoint(build(1), path)
    err, msg = info.value, str(info.value)
    assert 'levels.3.blocks.2.mixer.qkv.weight' in err.unexpected
    assert 'levels.3.blocks.1.mixer.A_log' in err.unexpected
    assert 'levels.3.blocks.1.mixer.qkv.weight' in err.missing
    assert not err.mismatched
    assert str(path) in msg and 'unexpected keys' in msg and 'missing keys' in msg
    assert 'levels.3.blocks.1.mixer.A_log' in msg and 'levels.3.blocks.1.mixer.qkv.weight' in msg


def test_shallower_checkpoint_names_missing_keys(tmp_path):
    path = _variant_file(tmp_path, 3, depths=[1, 1, 1, 2])
    with pytest.raises(CheckpointMismatchError) as info:
        build(1, checkpoint_path=path)
    err, msg = info.value, str(info.value)
    assert 'levels.2.blocks.1.mixer.qkv.weight' in err.missing
    assert 'levels.2.blocks.1.mixer.qkv.weight' in msg and 'missing keys' in msg
    # the depth-1 stage's only block is Mamba in both, so there is nothing unexpected
    assert not err.unexpected and not err.mismatched


def test_wider_checkpoint_names_shape_mismatches(tmp_path):
    path = _variant_file(tmp_path, 3, dim=16)
    with pytest.raises(CheckpointMismatchError) as info:
        mambazoo.load_checkpoint(build(1), path)
    err, msg = info.value, str(info.value)
    keys = {k for k, _, _ in err.mismatched}
    assert 'patch_embed.conv_down.3.weight' in keys
    assert 'head.weight' in keys  # a wrong head alongside wrong body is not silently dropped
    assert 'patch_embed.conv_down.3.weight checkpoint [16, 4, 3, 3] vs model [8, 4, 3, 3]' in msg
    assert 'shape mismatches' in msg
    assert isinstance(info.value, CheckpointError)


def test_mismatch_leaves_model_untouched(tmp_path, x):
    path = _variant_file(tmp_path, 3, dim=16)
    target = build(1)
    before = logits(target, x)
    with pytest.raises(CheckpointMismatchError):
        mambazoo.load_checkpoint(target, path)
    torch.testing.assert_close(logits(target, x), before, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- 4. classes

@pytest.mark.parametrize('api', ['load_checkpoint', 'create_model'])
@pytest.mark.parametrize('num_classes', [5, 0])
def test_other_num_classes_loads_backbone(api, num_classes, tmp_path, x, source, caplog):
    path = w_official_tar(tmp_path, source[1], None)
    reference = build(1, num_classes=num_classes)  # same seed: the head the loaded model must keep
    caplog.set_level(logging.WARNING, logger=LOGGER)
    if api == 'create_model':
        model = build(1, num_classes=num_classes, checkpoint_path=path)
    else:
        model = build(1, num_classes=num_classes)
        mambazoo.load_checkpoint(model, path)
    head_warnings = [r for r in caplog.records if r.name == LOGGER and 'classifier' in r.getMessage()]
    assert len(head_warnings) == 1 and 'head.weight' in head_warnings[0].getMessage()

    src_feats = pooled_features(source[0], x)
    assert differs(pooled_features(reference, x), src_feats)
    torch.testing.assert_close(pooled_features(model, x), src_feats)
    out = logits(model, x)
    if num_classes == 0:
        torch.testing.assert_close(out, src_feats)
    else:
        assert out.shape == (2, num_classes)
        torch.testing.assert_close(model.head.weight, reference.head.weight, rtol=0, atol=0)
        torch.testing.assert_close(model.head.bias, reference.head.bias, rtol=0, atol=0)
        torch.testing.assert_close(out, reference.head(src_feats))


def test_headless_checkpoint_into_headless_model(tmp_path, x, source):
    headless = perturb(build(4, num_classes=0), seed=9)
    path = tmp_path / 'headless.safetensors'
    save_file(contiguous(headless.state_dict()), str(path))
    model = build(1, num_classes=0, checkpoint_path=path)
    torch.testing.assert_close(logits(model, x), logits(headless, x))


# ----------------------------------------------------------------------------------------------- 5. corrupt

def c_truncated_pth(d, sd):
    torch.save(sd, d / 'full.pth')
    data = (d / 'full.pth').read_bytes()
    (d / 'truncated.pth').write_bytes(data[:len(data) // 2])
    return d / 'truncated.pth'


def c_truncated_tar(d, sd):
    w_official_tar(d, sd, None)
    data = (d / HF_FILE).read_bytes()
    (d / 'truncated.pth.tar').write_bytes(data[:len(data) // 2])
    return d / 'truncated.pth.tar'


def c_random_bytes(d, sd):
    (d / 'random.pth').write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                                 generator=torch.Generator().manual_seed(5)).numpy().tobytes())
    return d / 'random.pth'


def c_random_safetensors(d, sd):
    (d / 'random.safetensors').write_bytes(bytes(range(256)) * 8)
    return d / 'random.safetensors'


def c_empty(d, sd):
    (d / 'empty.pth').write_bytes(b'')
    return d / 'empty.pth'


def c_empty_safetensors(d, sd):
    (d / 'empty.safetensors').write_bytes(b'')
    return d / 'empty.safetensors'


def c_truncated_safetensors(d, sd):
    save_file(sd, str(d / 'full.safetensors'))
    data = (d / 'full.safetensors').read_bytes()
    (d / 'truncated.safetensors').write_bytes(data[:len(data) // 2])
    return d / 'truncated.safetensors'


def c_truncated_in_hf_folder(d, sd):
    folder = d / 'hf'
    folder.mkdir()
    save_file(sd, str(d / 'full.safetensors'))
    data = (d / 'full.safetensors').read_bytes()
    (folder / 'model.safetensors').write_bytes(data[:len(data) // 3])
    return folder / 'model.safetensors'  # the message must name the file inside the folder


def c_missing(d, sd):
    return d / 'does_not_exist.pth'


def c_empty_folder(d, sd):
    (d / 'empty_folder').mkdir()
    return d / 'empty_folder'


def c_list(d, sd):
    torch.save([t for t in sd.values()][:3], d / 'list.pth')
    return d / 'list.pth'


def c_non_tensor_values(d, sd):
    torch.save({'epoch': 3, 'lr': 0.1, 'arch': 'mambavision_tiny'}, d / 'not_tensors.pth')
    return d / 'not_tensors.pth'


def c_non_tensor_in_state_dict(d, sd):
    bad = dict(sd)
    bad['head.weight'] = bad['head.weight'].tolist()
    torch.save({'state_dict': bad}, d / 'bad_value.pth')
    return d / 'bad_value.pth'


def c_empty_dict(d, sd):
    torch.save({}, d / 'empty_dict.pth')
    return d / 'empty_dict.pth'


CORRUPT = {f.__name__[2:]: f for f in (
    c_truncated_pth, c_truncated_tar, c_random_bytes, c_random_safetensors, c_empty, c_empty_safetensors,
    c_truncated_safetensors, c_truncated_in_hf_folder, c_missing, c_empty_folder, c_list,
    c_non_tensor_values, c_non_tensor_in_state_dict, c_empty_dict)}


@pytest.mark.parametrize('case', list(CORRUPT))
def test_corrupt_file_raises_checkpoint_error(case, tmp_path, x, source):
    path = CORRUPT[case](tmp_path, source[1])
    source_arg = path.parent if case == 'truncated_in_hf_folder' else path
    target = build(1)
    before = logits(target, x)
    with pytest.raises(CheckpointError) as info:
        mambazoo.load_checkpoint(target, source_arg)
    assert type(info.value) is CheckpointError  # not a mismatch, and not a bare RuntimeError/UnpicklingError
    assert str(path) in str(info.value)
    torch.testing.assert_close(logits(target, x), before, rtol=0, atol=0)
    with pytest.raises(CheckpointError):
        mambazoo.read_checkpoint(source_arg)


def test_corrupt_file_through_create_model(tmp_path):
    path = c_truncated_pth(tmp_path, {k: v for k, v in build(1).state_dict().items()})
    with pytest.raises(CheckpointError, match='truncated'):
        build(1, checkpoint_path=path)


# ----------------------------------------------------------------------------------------------- 6. strict=False

def test_strict_false_loads_partial_checkpoint(tmp_path, x, source):
    src_sd = source[1]
    partial = {k: v for k, v in src_sd.items() if not k.startswith(('levels.3.', 'head.'))}
    partial['bogus.weight'] = torch.ones(3)  # unexpected key
    partial['norm.weight'] = torch.ones(5)  # wrong shape
    path = tmp_path / 'partial.pth'
    torch.save({'model': partial}, path)

    with pytest.raises(CheckpointMismatchError) as info:
        mambazoo.load_checkpoint(build(1), path)
    assert 'levels.3.blocks.0.mixer.A_log' in info.value.missing
    assert 'bogus.weight' in info.value.unexpected
    assert 'norm.weight' in {k for k, _, _ in info.value.mismatched}

    target = build(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    mambazoo.load_checkpoint(target, path, strict=False)
    after = target.state_dict()
    for k, v in after.items():
        if k.startswith(('levels.3.', 'head.')) or k == 'norm.weight':
            assert torch.equal(v, before[k]), f'{k} should keep its own value'
        else:
            assert torch.equal(v, src_sd[k]), f'{k} should come from the checkpoint'
    assert differs(logits(target, x), source[2])

    # the missing part loaded afterwards makes the model whole: same logits as the source
    rest = {k: v for k, v in src_sd.items() if k.startswith(('levels.3.', 'head.')) or k == 'norm.weight'}
    mambazoo.load_checkpoint(target, rest, strict=False)
    torch.testing.assert_close(logits(target, x), source[2])
