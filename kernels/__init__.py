"""The Triton kernels and their launchers, one module per op (``kernels/<op>.py``), installed as
``streamkern.kernels``.

Run from a clone, the repository root is often on ``sys.path`` (a script, ``python -m``, pytest), and this folder
would then be the top-level package ``kernels``, shadowing an installed one (Hugging Face's ``kernels``, which
transformers imports). Imported under that name, this file hands the name over: to the ``kernels`` found on
``sys.path`` without the root, or, when there is none, to an empty namespace package, which is what Python makes of
a folder without ``__init__.py`` and what transformers' availability check reads as "not installed".
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        _spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        _spec.submodule_search_locations = []
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module   # the import statement returns what sys.modules holds once this file has run
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
