"""`python -m server --host H --port P --data-dir D --token T [--token T2] [--model-dir M]`."""
from __future__ import annotations

import sys
from collections.abc import Callable

from server.config import ServerConfig, load_config
from server.log_lines import configure_logging
from server.serving import run
from server.state import ServerState
from server.wiring import create_app


def main(argv: list[str] | None = None, build: Callable[[ServerConfig], ServerState] = create_app) -> None:
    """`build`: the state from the config (bench.null_server passes one with a null engine)."""
    config = load_config(sys.argv[1:] if argv is None else argv)
    configure_logging(config.log_format)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    run(build(config))


if __name__ == "__main__":
    main()
