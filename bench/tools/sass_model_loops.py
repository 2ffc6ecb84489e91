"""Runs the static H100 model (``../shared/tools/sass_model.py``, or ``$SASS_MODEL``) with two fixes to its loop
finder, needed by the v3 plane kernels (bench/NOTES.md, "Model"):

1. It takes the last *unpredicated* ``EXIT`` as the end of the kernel body, and fails with
   ``max() arg is an empty sequence`` on a kernel whose every EXIT is predicated (``@P0 EXIT``).
2. It treats every back edge after that EXIT as an out-of-line mbarrier retry. ptxas may lay a loop out as
   ``body; @P EXIT; BRA top``: the back edge then sits after the last EXIT and the loop is silently dropped
   (its instructions never counted). In a kernel without mbarrier waits (no ``SYNCS`` instruction) the end of
   the body is the final ``BRA`` to itself.

3. It names a loop after the nearest line, walking back from its back edge, that holds a ``for`` statement,
   ``tl.static_range`` loops included; those are unrolled and never close a SASS loop, but an unrolled body
   that ends in one (the fp32 split forward's nested static loops) would lend its name to the image loop around
   it. Here static loops are left out of that map (runtime loops keep the tool's names and numbering).

Usage: the tool's own command line, e.g. (from the checkout, in the triton 3.6 venv)
    python bench/tools/sass_model_loops.py predict --plan slak_triton.ops.compile_check:launch_plans \
        --plan-path . --kinds fwd,dx,dw --stages 1,2,3,4 --dtypes bfloat16 --density 1.0,0.6,0.3
Repository tool only (not installed with the package)."""
import os
import re
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_TOOL = os.environ.get("SASS_MODEL", os.path.join(_HERE, "..", "..", "..", "shared", "tools", "sass_model.py"))
sys.path.insert(0, os.path.dirname(os.path.abspath(_TOOL)))
import sass_model  # noqa: E402  (found through $SASS_MODEL / the shared tools folder)

_parse_sass = sass_model.parse_sass


def parse_sass(text):
    """The tool's parser, then: predicated EXITs count as exits, and without mbarrier waits the final self-branch
    marks the end of the body (so loops closed after the last EXIT are kept)."""
    ins = _parse_sass(text)
    for i in ins:
        if re.match(r"@!?U?P\w+\s+EXIT", i["text"]):
            i["text"] = "EXIT " + i["text"]     # the loop finder looks for text.startswith("EXIT")
    if not any(i["op"].startswith("SYNCS") for i in ins):
        selfs = [i for i in ins if i["cls"] == "branch" and i["target"] == i["addr"]]
        if selfs:
            selfs[-1]["text"] = "EXIT (end of body) " + selfs[-1]["text"]
    return ins


sass_model.parse_sass = parse_sass

_for_loops = sass_model.for_loops


def _static_lines(src_file):
    """Lines of the ``for ... in tl.static_range(...)`` statements of a source file."""
    import ast
    return {n.lineno for n in ast.walk(ast.parse(open(src_file).read()))
            if isinstance(n, ast.For) and isinstance(n.iter, ast.Call)
            and getattr(n.iter.func, "attr", getattr(n.iter.func, "id", "")) == "static_range"}


def for_loops(src_file):
    """The tool's {line: loop name} without the unrolled (``tl.static_range``) loops."""
    drop = _static_lines(src_file)
    return {line: name for line, name in _for_loops(src_file).items() if line not in drop}


sass_model.for_loops = for_loops

if __name__ == "__main__":
    sass_model.main()
