# The gateway image: gunicorn + gevent workers (see gunicorn.config.py).

# gunicorn's C request parser (requirements-fast.txt) comes from PyPI as source only: it is
# compiled here, so the final image needs no compiler.
FROM python:3.11-slim AS fast-parser
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY requirements-fast.txt .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels -r requirements-fast.txt

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /srv/gateway
COPY requirements.txt .
COPY --from=fast-parser /wheels /tmp/wheels
RUN pip install --no-cache-dir -r requirements.txt /tmp/wheels/*.whl && rm -rf /tmp/wheels
COPY app ./app
COPY data ./data
COPY migrations ./migrations
COPY alembic.ini db_manager.py run.py gunicorn.config.py ./
RUN useradd --system --home /srv/gateway gateway && mkdir -p instance && chown gateway instance
USER gateway
EXPOSE 8000
CMD ["gunicorn", "-c", "gunicorn.config.py", "app:create_app()"]
