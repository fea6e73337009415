"""No code execution from data: no unpickling, no implicit ``trust_remote_code``, planted pickles refused.

The source scan is done twice: the literal ``grep`` the acceptance criteria name, and an AST pass that also
sees calls split over several lines and aliased imports.
"""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hf_stage_attribution
from hf_stage_attribution import StageLedger
from hf_stage_attribution.errors import CheckpointImportError, LedgerFormatError

PACKAGE = Path(hf_stage_attribution.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


class _Evil:
    """Unpickling this creates ``path``: the marker that a pickle from the data was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# --- the source scan ---------------------------------------------------------------------------------------


def _grep(pattern: str) -> list[str]:
    hits = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(pattern, line) and not line.lstrip().startswith("#"):
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    return hits


def test_grep_finds_no_unpickling_and_no_trust_remote_code():
    assert len(SOURCES) > 20, "the scan should see the whole package"
    assert _grep(r"\bpickle\.loads?\(|\bdill\.|\bcloudpickle\.|\bjoblib\.load\(") == []
    assert _grep(r"trust_remote_code\s*=\s*True") == []
    assert [hit for hit in _grep(r"torch\.load\(") if "weights_only=True" not in hit] == []


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _import_aliases(tree: ast.AST) -> dict[str, str]:
    """``{local name: dotted name it was imported as}`` for every import in ``tree``."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
    return aliases


def unsafe_calls(source: str) -> list[str]:
    """What in ``source`` could execute code from data (see the test below for the rules)."""
    tree = ast.parse(source)
    aliases = _import_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            named = [*args.posonlyargs, *args.args][-len(args.defaults) :] if args.defaults else []
            pairs = [*zip(named, args.defaults), *zip(args.kwonlyargs, args.kw_defaults)]
            found += [f"line {node.lineno}: default trust_remote_code=True" for a, d in pairs
                      if a.arg == "trust_remote_code" and _is_true(d)]  # fmt: skip
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"line {node.lineno}: {full}"
        if full in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "joblib.load",
                    "cloudpickle.load", "cloudpickle.loads", "marshal.loads", "shelve.open"):  # fmt: skip
            found.append(where)
        elif full == "torch.load" and not _is_true(keywords.get("weights_only")):
            found.append(f"{where} without weights_only=True")
        elif full in ("numpy.load", "np.load") and "allow_pickle" in keywords:
            found.append(f"{where} with allow_pickle")
        elif full in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            loader = _dotted(keywords.get("Loader", ast.Constant(None)))
            if full.endswith(("unsafe_load", "full_load")) or not loader.endswith(("SafeLoader", "CSafeLoader")):
                found.append(f"{where} without a SafeLoader")
        elif full in ("eval", "exec", "builtins.eval", "builtins.exec"):
            found.append(where)
        if "trust_remote_code" in keywords and _is_true(keywords["trust_remote_code"]):
            found.append(f"{where} with trust_remote_code=True")
    return found


def test_the_ast_scan_flags_what_the_rules_forbid():
    bad = """
import pickle, yaml, numpy as np
from torch import load as tl
import torch
def f(path, trust_remote_code=True): ...
pickle.loads(b"")
tl(path)
torch.load(
    path, map_location="cpu")
np.load(path, allow_pickle=True)
yaml.load(text)
eval("1")
AutoModel.from_pretrained(p, trust_remote_code=True)
"""
    assert len(unsafe_calls(bad)) == 8
    good = """
import torch, yaml
torch.load(path, map_location="cpu", weights_only=True)
yaml.load(text, Loader=yaml.SafeLoader)
AutoModel.from_pretrained(p, trust_remote_code=False)
def f(trust_remote_code=False): ...
"""
    assert unsafe_calls(good) == []


def test_no_module_of_the_package_can_execute_code_from_data():
    found = {
        str(path.relative_to(PACKAGE.parent)): hits
        for path in SOURCES
        if (hits := unsafe_calls(path.read_text(encoding="utf-8")))
    }
    assert found == {}


# --- calls that import or run code: each one known, and each gated -----------------------------------------

_CODE_LOADERS = (
    "evaluate.load", "importlib.import_module", "importlib.__import__", "__import__", "builtins.__import__",
    "importlib.util.spec_from_file_location", "importlib.util.module_from_spec",
    "importlib.machinery.SourceFileLoader",
    "runpy.run_path", "runpy.run_module", "compile", "builtins.compile", "pydoc.locate",
    "transformers.dynamic_module_utils.get_class_from_dynamic_module",
)  # fmt: skip
# (file, enclosing function, call) -> why it cannot run code from data. A new entry needs a reviewed reason.
KNOWN_CODE_LOADERS = {
    ("hf_stage_attribution/__init__.py", "__getattr__", "importlib.import_module"): "lazy import of our own modules",
    ("hf_stage_attribution/ledger/__init__.py", "__getattr__", "importlib.import_module"): "lazy own modules",
    ("hf_stage_attribution/integrations/__init__.py", "__getattr__", "importlib.import_module"): "lazy own modules",
    ("hf_stage_attribution/cli/main.py", "build_parser", "importlib.import_module"): "our own command modules",
    ("hf_stage_attribution/behaviors/custom.py", "import_callable", "importlib.import_module"): "needs trust_code",
    ("hf_stage_attribution/integrations/replay.py", "import_class", "importlib.import_module"):
        "only transformers/trl modules (allow-list checked first)",
    ("hf_stage_attribution/behaviors/scorers.py", "EvaluateScorer.__init__", "evaluate.load"): "needs trust_code",
    # trust_remote_code given a variable: always the caller's trust_code (default False), never a file's value
    ("hf_stage_attribution/behaviors/loading.py", "load_tokenizer", "trust_remote_code"): "trust_code",
    ("hf_stage_attribution/behaviors/loading.py", "load_sequence_classifier", "trust_remote_code"): "trust_code",
    ("hf_stage_attribution/integrations/model_loading.py", "load_model", "trust_remote_code"): "trust_code",
    ("hf_stage_attribution/behaviors/scorers.py", "TransformersClassifierScorer.__init__", "trust_remote_code"):
        "trust_code",
}  # fmt: skip


def code_loaders(source: str) -> set[tuple[str, str]]:
    """``(enclosing function, call)`` for every call in ``source`` that imports code by a computed name, and
    every ``trust_remote_code=`` that is not the literal ``False``."""
    tree = ast.parse(source)
    aliases = _import_aliases(tree)
    found: set[tuple[str, str]] = set()

    def visit(node: ast.AST, scope: list[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = [*scope, node.name]
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, rest = name.partition(".")
            full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
            literal = node.args and isinstance(node.args[0], ast.Constant)
            if full in _CODE_LOADERS and not (full == "importlib.import_module" and literal):
                found.add((".".join(scope) or "<module>", full))
            for k in node.keywords:
                if k.arg == "trust_remote_code" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                    found.add((".".join(scope) or "<module>", "trust_remote_code"))
        if isinstance(node, ast.Dict):  # options dicts splatted into from_pretrained(**load)
            for key, value in zip(node.keys, node.values):
                opted_in = not (isinstance(value, ast.Constant) and value.value is False)
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and opted_in:
                    found.add((".".join(scope) or "<module>", "trust_remote_code"))
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, [])
    return found


def test_the_code_loader_scan_sees_every_way_of_importing_code():
    bad = """
import evaluate, importlib
from importlib import import_module as im
from transformers import AutoModel
def f(path, name, trust):
    evaluate.load(path)
    im(name)
    __import__(name)
    importlib.util.spec_from_file_location("m", path)
    AutoModel.from_pretrained(path, trust_remote_code=trust)
    load = {"trust_remote_code": trust}
"""
    assert code_loaders(bad) == {
        ("f", "evaluate.load"), ("f", "importlib.import_module"), ("f", "__import__"),
        ("f", "importlib.util.spec_from_file_location"), ("f", "trust_remote_code"),
    }  # fmt: skip
    good = """
import importlib
def f(path):
    importlib.import_module("json")
    AutoModel.from_pretrained(path, trust_remote_code=False)
"""
    assert code_loaders(good) == set()


def test_every_code_loading_call_of_the_package_is_a_known_gated_one():
    """A new evaluate.load / import by computed name / trust_remote_code=<not False> fails here until it is gated
    behind trust_code (or shown to load only our own modules) and listed in KNOWN_CODE_LOADERS."""
    found = {
        (str(path.relative_to(PACKAGE.parent)), scope, call)
        for path in SOURCES
        for scope, call in code_loaders(path.read_text(encoding="utf-8"))
    }
    assert found - set(KNOWN_CODE_LOADERS) == set(), "gate these behind trust_code and list them"
    assert set(KNOWN_CODE_LOADERS) - found == set(), "stale entries: remove them"


def test_grep_finds_every_evaluate_load_behind_trust_code():
    hits = _grep(r"\bevaluate\.load\(")
    assert len(hits) == 1 and "behaviors/scorers.py" in hits[0]
    source = (PACKAGE / "behaviors" / "scorers.py").read_text(encoding="utf-8")
    init = source[source.index("class EvaluateScorer") : source.index("evaluate.load(")]
    assert "if not trust_code:" in init and "raise UnsafeInputError" in init


# --- planted pickles -----------------------------------------------------------------------------------------


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in torch.nn.Linear(3, 2).state_dict().items()}


def _pickle_payloads(marker: Path) -> dict[str, bytes]:
    """A raw pickle and a torch.save zip, each running code when unpickled."""
    raw = pickle.dumps({"weight": _Evil(str(marker))})
    zipped = marker.parent / "zipped.bin"
    torch.save({"weight": _Evil(str(marker))}, zipped)
    return {"raw pickle": raw, "torch.save": zipped.read_bytes()}


@pytest.mark.parametrize("how", ["raw pickle", "torch.save"])
def test_pickle_disguised_as_model_safetensors_is_refused(tmp_path, how):
    base, later = tmp_path / "base", tmp_path / "later"
    for folder in (base, later):
        folder.mkdir()
        save_file(_tiny_state(), str(folder / "model.safetensors"))
    marker = tmp_path / "pwned"
    (later / "model.safetensors").write_bytes(_pickle_payloads(marker)[how])
    boundaries = [{"model": str(base)}, {"model": str(later), "name": "sft"}]
    for allow_pickle in (False, True):  # even with permission a .safetensors file is never unpickled
        with pytest.raises(CheckpointImportError, match="model.safetensors"):
            StageLedger.from_checkpoints(boundaries, tmp_path / "ledger", progress=False, allow_pickle=allow_pickle)
    assert not marker.exists()
    assert not (tmp_path / "ledger").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["raw pickle", "torch.save"])
def test_malicious_pytorch_model_bin_is_refused_even_when_pickles_are_allowed(tmp_path, how):
    base, later = tmp_path / "base", tmp_path / "later"
    base.mkdir()
    later.mkdir()
    save_file(_tiny_state(), str(base / "model.safetensors"))
    marker = tmp_path / "pwned"
    (later / "pytorch_model.bin").write_bytes(_pickle_payloads(marker)[how])
    boundaries = [{"model": str(base)}, {"model": str(later), "name": "sft"}]
    with pytest.raises(CheckpointImportError, match="pickle"):  # refused outright without permission
        StageLedger.from_checkpoints(boundaries, tmp_path / "a", progress=False)
    with pytest.raises(CheckpointImportError, match="weights_only"):  # with permission: weights_only refuses it
        StageLedger.from_checkpoints(boundaries, tmp_path / "b", progress=False, allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    "rel", ["start.safetensors", "stages/000-a/delta.safetensors", "stages/000-a/optimizer_state.safetensors"]
)
def test_pickle_planted_in_a_ledger_is_refused(tmp_path, rel):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()  # a momentum buffer, so the stage stores optimizer_state.safetensors
    ledger = StageLedger(tmp_path / "ledger")
    with ledger.record_stage("a", model=model, optimizer=opt) as rec:
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        rec.step()
    marker = tmp_path / "pwned"
    for how, payload in _pickle_payloads(marker).items():
        (tmp_path / "ledger" / rel).write_bytes(payload)
        with pytest.raises(LedgerFormatError, match=Path(rel).name):
            loaded = StageLedger.load(tmp_path / "ledger")
            loaded.stages[0].delta()
            loaded.stages[0].optimizer_state_at_start()
        assert not marker.exists(), how


def test_loading_a_ledger_never_imports_pickle_readers(tmp_path):
    """The ledger read path does not even reach torch.load: a module-level tripwire would fire."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with StageLedger(tmp_path / "l").record_stage("a", model=model, optimizer=opt) as rec:
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        rec.step()
    calls = []
    real_load, real_unpickler = torch.load, pickle.Unpickler

    def tripwire(*args, **kwargs):
        calls.append(args)
        return real_load(*args, **kwargs)

    class Tripwire(real_unpickler):
        def __init__(self, *args, **kwargs):
            calls.append(args)
            super().__init__(*args, **kwargs)

    torch.load, pickle.Unpickler = tripwire, Tripwire
    try:
        ledger = StageLedger.load(tmp_path / "l")
        ledger.final_state().materialize()
        ledger.stages[0].delta()
        ledger.verify()
    finally:
        torch.load, pickle.Unpickler = real_load, real_unpickler
    assert calls == []
