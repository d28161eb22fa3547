"""What the log says once at startup: what runs, where, and with what.

An operator reading the first lines of the log should not have to guess
which version runs, where it listens, where keys and counters live, whether
the admin API can be used and how many processes serve. Passwords in
DATABASE_URL or REDIS_URL never appear.
"""

import os

from twisted.logger import Logger

import apigw
from apigw.config import parse_database_url, parse_redis_url

log = Logger(namespace="apigw")


def log_startup(config, port, admin_port, workers):
    """One line each: version, listeners, services, key store, limiter,
    master key, workers."""
    env = config.env
    log.info("apigw {version} starting (pid {pid})", version=apigw.__version__, pid=os.getpid())
    if admin_port is None:
        log.info("listeners: public {port}, with the admin API at /admin on it", port=port)
    else:
        log.info("listeners: public {port}, admin {admin_port}", port=port, admin_port=admin_port)
    log.info("services: {services}", services=", ".join(config.services) or "(none)")
    log.info("key store: {where}", where=parse_database_url(env.database_url).describe())
    if env.redis_url:
        log.info("rate limiter: {where}, shared by every gateway process",
                 where=parse_redis_url(env.redis_url).describe())
    elif workers > 1:
        log.info("rate limiter: in-process, per worker: each of the {n} workers admits up to"
                 " the limit (set REDIS_URL for one limit across them)", n=workers)
    else:
        log.info("rate limiter: in-process")
    if env.master_key:
        log.info("master key: set")
    else:
        log.warn("master key: MASTER_KEY is not set: the admin API answers 403 to every request")
    if workers > 1:
        log.info("workers: {n}, supervised by this process", n=workers)
    else:
        log.info("workers: 1 (this process serves requests itself)")
