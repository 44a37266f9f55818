"""``python3 -m bilik.interpreter``: serve the code interpreter on port 49999."""

from __future__ import annotations

import uvicorn

from .server import PORT, App


def main() -> None:
    uvicorn.run(
        App(),
        host="0.0.0.0",
        port=PORT,
        lifespan="on",
        log_level="warning",
        http="h11",
        ws="none",
        loop="asyncio",
    )


if __name__ == "__main__":
    main()
