# The gateway image: gunicorn + gevent workers (see gunicorn.config.py).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /srv/gateway
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY app ./app
COPY data ./data
COPY migrations ./migrations
COPY alembic.ini db_manager.py run.py gunicorn.config.py ./
RUN useradd --system --home /srv/gateway gateway && mkdir -p instance && chown gateway instance
USER gateway
EXPOSE 8000
CMD ["gunicorn", "-c", "gunicorn.config.py", "app:create_app()"]
