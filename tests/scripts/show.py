"""A user script for the runner's process tests: prints what a script can see of how it was run, then does what
its first argument asks (raise, exit, read stdin, ...). Imports nothing heavy."""

import os
import sys


def main() -> None:
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    print("argv", sys.argv)
    print("path0", sys.path[0])
    print("name", __name__, "file", globals().get("__file__"), "package", __package__)
    print("spec", getattr(__spec__, "name", None), "loader", type(__loader__).__name__)
    print("globals", sorted(globals()))
    print("main is this module", sys.modules["__main__"].__dict__ is globals())
    print("cwd", os.getcwd())
    if action == "stdin":
        print("stdin", sys.stdin.read())
    elif action == "raise":
        try:
            {}["missing"]
        except KeyError as exc:
            raise ValueError("raised by the script") from exc
    elif action == "exit-3":
        sys.exit(3)
    elif action == "exit-message":
        sys.exit("the script says goodbye")
    elif action == "ctrl-c":
        raise KeyboardInterrupt
    elif action == "hook":
        sys.excepthook = lambda kind, value, tb: print(
            "custom hook saw", kind.__name__, value, "from", tb.tb_frame.f_code.co_name
        )
        raise RuntimeError("seen by the script's own excepthook")


if __name__ == "__main__":
    main()
