"""Every golden case of ../shared/golden through the Python API, with every implementation
golden_ops.OPS lists for its op (one test per case and implementation). A case whose op has no
implementation fails: the suite must cover every op of the folder."""
import pytest

from conftest import GOLDEN_DIR
from golden_ops import OPS, Case, compare


def _cases():
    if not GOLDEN_DIR.is_dir():
        return []
    return sorted(d for d in GOLDEN_DIR.iterdir() if d.is_dir() and not d.name.startswith("."))


def _params():
    out = []
    for d in _cases():
        case = Case(d)
        impls = OPS.get(case.op)
        if not impls:
            out.append(pytest.param(d, None, id=f"{d.name}[unbound op {case.op}]"))
            continue
        for label in impls:
            out.append(pytest.param(d, label, id=f"{d.name}[{label}]"))
    return out


def test_golden_folder_present():
    assert GOLDEN_DIR.is_dir(), f"no golden folder at {GOLDEN_DIR} (set MNEMO_GOLDEN_DIR)"
    assert len(_cases()) > 0, f"no case folders in {GOLDEN_DIR}"


@pytest.mark.parametrize("folder,label", _params())
def test_golden(folder, label):
    c = Case(folder)
    assert label is not None, f"op '{c.op}' has no Python implementation in golden_ops.OPS"
    got = OPS[c.op][label](c)
    failures = []
    for name in c.outputs:
        if name not in got:
            failures.append(f"{name}: not produced")
            continue
        f = compare(name, got[name], c[name], c.atol, c.rtol)
        if f:
            failures.append(f)
    extra = set(got) - set(c.outputs)
    assert not extra, f"produced outputs meta.json does not list: {sorted(extra)}"
    assert not failures, " | ".join(failures)
