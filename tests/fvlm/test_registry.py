"""fvlm.registry.Registry: the one registry type of every pluggable kind (issue 18 item 3)."""

from __future__ import annotations

import sys

import pytest

from fvlm.registry import Registry


class Widget:
    """A widget. Second sentence, not in the help line."""

    def __init__(self, config, size: int, colour: str = "red") -> None:
        self.config, self.size, self.colour = config, size, colour


def make_any(**options):
    return options


def test_register_by_decorator_or_call_and_create_with_checked_options() -> None:
    reg: Registry = Registry("widget")
    assert reg.register("w", Widget) is Widget

    @reg.register("any", help="takes anything")
    def _any(**options):
        return options

    assert reg.names() == ["any", "w"] and list(reg) == ["w", "any"] and len(reg) == 2 and "w" in reg
    assert reg["w"] is Widget and reg.get_obj("w") is Widget
    w = reg.create("w", "cfg", size=3)
    assert (w.config, w.size, w.colour) == ("cfg", 3, "red")
    assert reg.create("any", x=1) == {"x": 1}  # **options: anything goes
    assert reg.options("w", positional=1) == ["size", "colour"] and reg.options("any") is None
    with pytest.raises(ValueError, match=r"widget 'w': unknown option\(s\) shape; its options: size, colour"):
        reg.create("w", "cfg", size=3, shape="round")
    with pytest.raises(ValueError, match=r"widget 'w': missing option\(s\) size; its options: size, colour"):
        reg.create("w", "cfg")
    with pytest.raises(ValueError, match="unknown widget 'x'; registered widgets: any, w"):
        reg.create("x")
    with pytest.raises(KeyError):  # a mapping: plain KeyError on item access
        reg["x"]


def test_duplicates_bad_names_overwrite_and_unregister() -> None:
    reg: Registry = Registry("widget")
    reg.register("w", Widget)
    with pytest.raises(ValueError, match="widget 'w' is already registered; pass overwrite=True"):
        reg.register("w", make_any)
    reg.register("w", make_any, overwrite=True)
    assert reg["w"] is make_any
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", Widget)
    reg.unregister("w")
    reg.unregister("never")  # absent: ignored
    assert reg.names() == []
    with pytest.raises(ValueError, match="registered widgets: none"):
        reg.entry("w")


def test_defaults_where_error_type_and_help_lines() -> None:
    class MyError(ValueError):
        pass

    reg: Registry = Registry("gadget", plural="gadgetry", where="model.gadgets", error=MyError)
    reg.register("w", Widget, defaults={"size": 2})
    reg.register("big", Widget, defaults={"size": 9}, help="a big one")
    assert reg.create("w", None).size == 2 and reg.create("w", None, size=5).size == 5
    assert reg.defaults("big") == {"size": 9}
    with pytest.raises(ValueError, match=r"model.gadgets.bad: unknown option\(s\) bogus"):  # checked when registered
        reg.register("bad", Widget, defaults={"bogus": 1})
    with pytest.raises(MyError, match=r"model.gadgets: unknown gadget 'x'; registered gadgetry: big, w"):
        reg.create("x")
    with pytest.raises(MyError, match=r"model.gadgets.w: unknown option\(s\) bogus"):
        reg.check_options("w", {"bogus": 1}, positional=1)
    assert reg.help_lines() == ["  big  a big one", "  w    A widget."]
    assert reg.entry("w").help == "A widget."

    class Documented:
        """A gadget with a pointer; see the module docstring.

        More text."""

    class Pointed:
        """Another gadget (module docstring)."""

    reg.register("doc", Documented)
    reg.register("ptr", Pointed)
    assert reg.entry("doc").help == "A gadget with a pointer." and reg.entry("ptr").help == "Another gadget."


#: the registry of the built-in loading test; the module it names registers into it when imported
PROBE: Registry = Registry("widget", builtin=("fvlm_registry_probe_builtins",))


def test_builtin_modules_load_on_first_lookup(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fvlm_registry_probe_builtins.py").write_text(
        "from tests.fvlm.test_registry import PROBE, Widget\n"
        "PROBE.register('builtin', Widget, keys=('a', 'b'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fvlm_registry_probe_builtins", raising=False)
    assert "fvlm_registry_probe_builtins" not in sys.modules
    assert PROBE.names() == ["builtin"]  # the lookup imported the module, which registered its entry
    assert PROBE.entry("builtin").meta == {"keys": ("a", "b")} and PROBE.entry("builtin").help == "A widget."
    assert PROBE.names() == ["builtin"]  # imported once: a second registration would have raised
