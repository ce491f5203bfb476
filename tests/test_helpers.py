"""The shared test helpers' own contract: a missing golden fixture fails a CI run (CI=true) and skips elsewhere."""
import pytest

from helpers import SHARED_FIXTURES, fixture_names, load_golden, read_fixture_json, require_fixture


@pytest.fixture(params=['true', 'TRUE', '1'])
def in_ci(request, monkeypatch):
    monkeypatch.setenv('CI', request.param)


@pytest.fixture(params=[None, '', 'false'])
def not_in_ci(request, monkeypatch):
    if request.param is None:
        monkeypatch.delenv('CI', raising=False)
    else:
        monkeypatch.setenv('CI', request.param)


def test_a_present_fixture_is_returned(tmp_path, in_ci):
    (tmp_path / 'keys.json').write_text('{}')
    assert require_fixture(tmp_path / 'keys.json') == tmp_path / 'keys.json'
    assert require_fixture(str(tmp_path)) == tmp_path


def test_missing_fixture_fails_in_ci(tmp_path, in_ci):
    missing = tmp_path / 'shared' / 'fixtures' / 'vim' / 'keys_vim_tiny.json'
    with pytest.raises(pytest.fail.Exception, match='CI=true') as info:
        require_fixture(missing)
    assert str(missing) in str(info.value)


def test_missing_fixture_skips_elsewhere(tmp_path, not_in_ci):
    missing = tmp_path / 'fixtures'
    with pytest.raises(pytest.skip.Exception, match='is missing') as info:
        require_fixture(missing)
    assert str(missing) in str(info.value)


def test_every_fixture_reader_goes_through_require_fixture(tmp_path, monkeypatch, in_ci):
    """Golden files, key lists and a family folder with no key list: all fail under CI."""
    family = 'no_such_family'
    assert not (SHARED_FIXTURES / family).exists()
    with pytest.raises(pytest.fail.Exception):
        read_fixture_json(family, 'keys_x.json')
    with pytest.raises(pytest.fail.Exception):
        load_golden(family, 'golden_x', dict)
    with pytest.raises(pytest.fail.Exception):
        fixture_names(family, 'keys_')
    import helpers
    (tmp_path / family).mkdir()
    monkeypatch.setattr(helpers, 'SHARED_FIXTURES', tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r'keys_\*\.json'):
        fixture_names(family, 'keys_')
    (tmp_path / family / 'keys_a.json').write_text('{}')
    assert fixture_names(family, 'keys_') == {'a'}
