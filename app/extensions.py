"""Shared extension objects, bound to the app in `create_app` (nothing here needs config at import)."""
from __future__ import annotations

import itertools
from typing import Optional, Union
from urllib.parse import urlsplit

import redis
from flask_cors import CORS
from flask_sqlalchemy import SQLAlchemy
from redis.cluster import ClusterNode, RedisCluster
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
cors = CORS()

# `redis+cluster://host:port[,host:port...]` (or `rediss+cluster://` for TLS) names a Redis
# Cluster by some of its nodes; the client discovers the others.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

RedisClient = Union[redis.Redis, RedisCluster]


def is_cluster_url(url: str, cluster: bool = False) -> bool:
    """True when `url` names a Redis Cluster (its scheme says so, or REDIS_CLUSTER is on)."""
    return bool(url) and (cluster or urlsplit(url).scheme in CLUSTER_SCHEMES)


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The (host, port) startup nodes of a cluster URL: `redis+cluster://a:7000,b:7001`."""
    netloc = urlsplit(url).netloc.rsplit("@", 1)[-1]
    nodes = []
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":")
        nodes.append((host or part.strip(), int(port) if host else 6379))
    return nodes


def _node_url(url: str, host: str, port: int) -> str:
    """A plain `redis://` URL of one node of a cluster URL (credentials and TLS kept, no db)."""
    parts = urlsplit(url)
    scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return f"{scheme}://{auth}{host}:{port}"


def make_redis(url: str, max_connections: int, cluster: bool = False) -> Optional[RedisClient]:
    """A client with a *blocking* pool sized to the worker's concurrency (one pool per node on a
    cluster; see docs/traps.md): it waits for a free connection instead of raising at the cap."""
    if not url:
        return None
    options = dict(socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)
    if is_cluster_url(url, cluster):
        first = _node_url(url, *cluster_nodes(url)[0]) if urlsplit(url).scheme in CLUSTER_SCHEMES else url
        startup = [ClusterNode(h, p) for h, p in cluster_nodes(url)] \
            if urlsplit(url).scheme in CLUSTER_SCHEMES else None
        return RedisCluster.from_url(first, startup_nodes=startup, max_connections=max_connections,
                                     connection_pool_class=redis.BlockingConnectionPool, timeout=5,
                                     **options)
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5, **options)
    return redis.Redis(connection_pool=pool)


def subscriber_urls(url: str) -> "itertools.cycle[str]":
    """Plain node URLs to SUBSCRIBE on, tried in turn on reconnects. On a cluster a PUBLISH
    reaches the subscribers of every node (the cluster bus forwards it), so one node is enough;
    cycling through the startup nodes survives the loss of one."""
    if urlsplit(url).scheme in CLUSTER_SCHEMES:
        return itertools.cycle([_node_url(url, h, p) for h, p in cluster_nodes(url)])
    return itertools.cycle([url])
