"""``python -m cnnkit.serve``: serve a model with uvicorn, without the CLI (the slim image's entry).

The slim image has no Typer or Rich, and no Keras: the model comes from ``CNNKIT_MODEL`` (or the
first argument), the engine from ``CNNKIT_ENGINE``. A model that cannot be served is one line on
stderr and exit status 2, as from ``cnnkit serve``; the server's own options are uvicorn's host
and port.

Usage: python -m cnnkit.serve [SOURCE] [--host 127.0.0.1] [--port 8501]
"""

from __future__ import annotations

import argparse
import sys

from cnnkit.errors import CnnkitError, describe_os_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnkit.serve", description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", help="run directory, .keras file, ONNX export folder or NAME@stage "
                                                  "(default: CNNKIT_MODEL)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8501, help="TCP port (TF Serving's REST port is 8501)")
    args = parser.parse_args(argv)
    from cnnkit.serve import listen
    from cnnkit.serve.app import create_app

    try:
        sock = listen.bind(args.host, args.port)  # before the model loads: a port in use fails at once
        app = create_app(args.source)
    except CnnkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a model folder this user may not read
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
    print(f"serving {app.state.source.path} at {listen.url(args.host, sock)}v1/models/{app.state.source.name}",
          file=sys.stderr, flush=True)  # uvicorn prints no address for a socket it is given
    listen.run(app, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
