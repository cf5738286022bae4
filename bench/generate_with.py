"""``kvq generate`` with kernel module settings changed first (not a test): the end-to-end A/B of a kernel path in
one device command, e.g. the Gluon program against the ``tl.dot`` program it replaces.

    python bench/generate_with.py kvq_kernels.decode_attention.KIVI_MMA=False -- \\
        --model random:llama-3-8b --method kivi2 --context 128K --max-new-tokens 64 --chunk 8192 --json

Each ``MODULE.NAME=VALUE`` before ``--`` sets a module attribute (VALUE a Python literal); the rest are ``kvq
generate``'s arguments. Results: ``docs/results/decode-e2e-h200.md`` (session 12).
"""
import ast
import importlib
import sys


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: generate_with.py MODULE.NAME=VALUE ... -- <kvq generate arguments>")
    i = argv.index("--")
    for setting in argv[:i]:
        key, value = setting.split("=", 1)
        module, name = key.rsplit(".", 1)
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            raise SystemExit(f"{module} has no setting {name}")
        setattr(mod, name, ast.literal_eval(value))
    sys.argv = ["kvq", "generate", *argv[i + 1:]]
    from kvq_cli.cli import main as kvq

    kvq()


if __name__ == "__main__":
    main(sys.argv[1:])
