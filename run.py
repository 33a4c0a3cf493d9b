#!/usr/bin/env python3
"""Development entry point: `python run.py` (production: gunicorn -c gunicorn.config.py).

In embedded mode (no DATABASE_URL) the SQLite schema is migrated to head at start-up, so a
fresh checkout answers at once.
"""
from __future__ import annotations

import os

from app import create_app
from app.config import Settings, load_dotenv_once


def main() -> None:
    load_dotenv_once()
    settings = Settings.from_env()
    if settings.embedded_database:
        import db_manager
        db_manager.upgrade(settings.DATABASE_URL)
    app = create_app(settings)
    runtime = app.extensions["gateway"]
    host = os.environ.get("HOST") or "127.0.0.1"
    port = int(os.environ.get("PORT") or "8000")
    # Started once, before the server's threads exist; closed when it stops (Ctrl-C included):
    # queued settlements and usage rows are sent first.
    runtime.start()
    try:
        app.run(host=host, port=port, threaded=True, debug=False, use_reloader=False)
    finally:
        runtime.close()


if __name__ == "__main__":
    main()
