"""fused_optim._on_import: a function runs once, right after its module is
imported, whoever imports it and whether or not it already was."""

import sys

from fused_optim import _on_import


def test_runs_after_the_module_executes_once_and_at_once_when_imported(tmp_path, monkeypatch):
    (tmp_path / "late_module.py").write_text("VALUE = 42\n")
    (tmp_path / "other_module.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    # (this process's own pending registrations set aside)
    monkeypatch.setattr(_on_import, "_PENDING", {})
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path
                                           if not isinstance(f, _on_import._RunAfterImport)])
    seen = []
    _on_import.when_imported("late_module", lambda: seen.append(sys.modules["late_module"].VALUE))
    _on_import.when_imported("late_module", lambda: seen.append("second"))
    _on_import.when_imported("other_module", lambda: seen.append("other"))
    try:
        assert seen == []
        import late_module  # noqa: F401

        assert seen == [42, "second"]  # (after the body ran, in order)
        import late_module  # noqa: F401,F811

        assert seen == [42, "second"]
        import other_module  # noqa: F401

        assert seen == [42, "second", "other"]
        # (the finder leaves once nothing is pending)
        assert not any(isinstance(f, _on_import._RunAfterImport) for f in sys.meta_path)
        _on_import.when_imported("late_module", lambda: seen.append("now"))
        assert seen[-1] == "now"
    finally:
        sys.modules.pop("late_module", None)
        sys.modules.pop("other_module", None)
