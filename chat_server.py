"""Chat with a model: a Gradio chat page and an OpenAI-compatible API from one process.

    python chat_server.py --model runs/demo/hf                    # http://127.0.0.1:7860/ and /v1
    python chat_server.py --model DIR --port 8000 --slots 16
    OPEN_LLAMA_API_KEY=secret python chat_server.py --model DIR --host 0.0.0.0

Any Hugging Face Llama folder with a chat template works, ours or another's. `--help` lists every option
(--server.* and --engine.*, also settable from a YAML file with --config) and the short flags below;
see docs/serving.md.
"""

from __future__ import annotations

import logging
import sys

from common.config import ConfigError, parse_config
from serve.app import ChatServerConfig, serve

PROG = "chat_server.py"
# Short flags for the keys set most often; the dash spellings are the usual style of command-line tools.
ALIASES = {
    "model": "server.model",
    "host": "server.host",
    "port": "server.port",
    "api_key": "server.api_key",
    "api-key": "server.api_key",
    "model_name": "server.model_name",
    "model-name": "server.model_name",
    "slots": "engine.slots",
    "max_queue": "engine.max_queue",
    "max-queue": "engine.max_queue",
    "device": "engine.device",
    "dtype": "engine.dtype",
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = parse_config(ChatServerConfig, argv, aliases=ALIASES, prog=PROG)
        serve(config)
    except (ConfigError, ValueError) as exc:  # the config, or a model folder that cannot be served
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
