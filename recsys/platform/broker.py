"""Sends work to the Celery worker by task name, exactly as any other backend would.

The core never imports `worker`: it only knows the task names and queues below, which
`worker.tasks` registers. A Celery app made from the settings' broker URL is kept per
process (a forked child builds its own), with short connection timeouts so that a broker
that is down makes a submit fail fast instead of hanging; the job row stays queued and the
sweeper sends it later.

`send_rerank` is on every submission's path, where Celery's `send_task` cost more than the rest of
the request (kombu builds a Redis client per message). After a process's first message to a Redis
broker, which goes through `send_task` and so declares the queue, it builds the same message with
Celery's own code and pushes it on the queue's list as kombu would, on a connection kept per process.
Several messages can go in one LPUSH (`send_reranks`: the API's relay, recsys.jobs.relay). A push need not wait
for its reply (`wait=False`): the connection's next push, or `settle_pushes`, reads it, and sends the messages
again if the connection was lost before it came.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu.entity import PERSISTENT_DELIVERY_MODE
from kombu.transport.virtual.base import Base64
from kombu.utils.json import dumps as json_dumps

from recsys.config import Settings

log = logging.getLogger(__name__)

RERANK_TASK = "recsys.rerank"
SUBMIT_TASK = "recsys.submit"
DISCOVER_TASK = "recsys.discover"
SWEEP_TASK = "recsys.sweep"
RERANK_QUEUE = "rerank"
JSON = "json"
DEFAULT_QUEUE = "celery"

_apps: dict[tuple[int, str], Celery] = {}
_declared: set[tuple[int, str]] = set()
_lock = threading.Lock()
REDIS_SCHEMES = ("redis://",)  # kombu and redis-py read these URLs alike
# As Celery's task_publish_retry_policy below: two more tries, a moment apart, then the sweeper's turn.
PUBLISH_RETRIES = 2
PUBLISH_RETRY_SECONDS = 0.2


class BrokerUnavailable(RuntimeError):
    """The broker could not take the message; the job row is kept and re-sent later."""


def client_config(broker_url: str) -> dict:
    """Settings shared by the sending client and the worker app: JSON only, fail fast on a dead broker.

    The client has no result backend: it only sends (a backend would also retry for ~20 s on a dead broker).
    """
    return {
        "broker_url": broker_url,
        "task_serializer": JSON,
        "result_serializer": JSON,
        "accept_content": [JSON],
        "broker_connection_timeout": 2.0,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"socket_connect_timeout": 1.0, "socket_timeout": 5.0},
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        "task_default_queue": DEFAULT_QUEUE,
    }


def client(settings: Settings) -> Celery:
    """This process's sending app for the settings' broker."""
    url = settings.celery_broker_url
    key = (os.getpid(), url)
    with _lock:
        app = _apps.get(key)
        if app is None:
            app = Celery("recsys-client", set_as_current=False)
            app.conf.update(client_config(url))
            _apps[key] = app
        return app


def send_rerank(
    job_id: str, settings: Settings, *, countdown: float | None = None, wait: bool = True,
    on_lost: Callable[[Exception], None] | None = None,
) -> None:
    """Queue `recsys.rerank(job_id)` on the rerank queue; the Celery task id is the job id.

    `wait=False` writes the message to the broker without waiting for its reply, which is read when the
    connection is next used for a push (`_settle`), or by `settle_pushes`: a blocking round trip less for
    the caller. A message whose reply then says it was not taken is sent again; if that fails too,
    `on_lost(error)` is called, from whichever thread settles it. A process's first message always waits (it
    goes through `send_task`, which declares the queue).
    """
    send_reranks([job_id], settings, countdown=countdown, wait=wait, on_lost=on_lost)


def send_reranks(
    job_ids, settings: Settings, *, countdown: float | None = None, wait: bool = True,
    on_lost: Callable[[Exception], None] | None = None,
) -> None:
    """`send_rerank` for several jobs in one LPUSH (their messages in the order given, each as `send_rerank` would
    send it): one round trip for a batch. `on_lost` is called once for the whole push."""
    ids = [str(job_id) for job_id in job_ids]
    url = settings.celery_broker_url
    which = f"job {ids[0]}" if len(ids) == 1 else f"{len(ids)} jobs"
    try:
        if ids and (os.getpid(), url) not in _declared:
            client(settings).send_task(RERANK_TASK, args=[ids[0]], queue=RERANK_QUEUE, task_id=ids[0],
                                       countdown=countdown)
            if url.startswith(REDIS_SCHEMES):
                with _lock:
                    _declared.add((os.getpid(), url))
            else:
                for job_id in ids[1:]:
                    client(settings).send_task(RERANK_TASK, args=[job_id], queue=RERANK_QUEUE, task_id=job_id,
                                               countdown=countdown)
                return
            ids = ids[1:]
        if ids:
            app = client(settings)
            _push([rerank_json(app, job_id) if not countdown else json_dumps(rerank_message(app, job_id, countdown))
                   for job_id in ids], settings, wait=wait, on_lost=on_lost)
    except Exception as exc:
        raise BrokerUnavailable(f"broker {url} did not take {which}: {exc}") from exc


def rerank_message(app: Celery, job_id: str, countdown: float | None = None) -> dict:
    """The message `app.send_task(RERANK_TASK, args=[job_id], queue=RERANK_QUEUE, task_id=job_id, countdown=...)`
    puts on a Redis broker's `rerank` list: Celery's task message (protocol 2) in kombu's envelope.

    Written out here because Celery's own builder (`app.amqp.as_task_v2`) cost a tenth of a submission in
    settings look-ups and `saferepr`; tests/test_hot_paths.py holds it equal to what `send_task` sends. Only
    the delivery tag (random) and the eta (now + countdown, UTC as the client app's default) differ from one
    call to the next.
    """
    eta = (datetime.now(UTC) + timedelta(seconds=countdown)).isoformat() if countdown else None
    headers = {
        "lang": "py", "task": RERANK_TASK, "id": job_id, "shadow": None, "eta": eta, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": job_id,
        "parent_id": None, "argsrepr": repr([job_id]), "kwargsrepr": "{}", "origin": _origin(),
        "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }  # argsrepr: saferepr of one short string in a list is its repr
    data = _body_json(job_id)
    properties = {
        "correlation_id": job_id,
        "reply_to": app.thread_oid,
        "delivery_mode": PERSISTENT_DELIVERY_MODE,
        "delivery_info": {"exchange": "", "routing_key": RERANK_QUEUE},  # direct queue: kombu's anonymous exchange
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    return {"body": Base64().encode(data), "content-encoding": "utf-8", "content-type": "application/json",
            "headers": headers, "properties": properties}


def rerank_json(app: Celery, job_id: str) -> str:
    """`json_dumps(rerank_message(app, job_id))`, the text kombu pushes, filled into a template made once per process
    and thread (`reply_to` is the thread's): building and encoding the message was ~25 µs of a submission, this ~5.

    The template is a message made for stand-in ids (32 hex digits, which no other part of it can hold), so
    only the job id, the delivery tag and the base64 body, which holds the id, differ from one call to the next.
    """
    templates = getattr(_templates, "by_app", None)
    if templates is None:
        templates = _templates.by_app = {}
    template = templates.get(app)
    if template is None or template[0] != os.getpid():
        template = templates[app] = _rerank_template(app)
    _pid, text, body, job, tag, encoded = template
    encoded_body = Base64().encode(body.replace(job, job_id))
    return text.replace(job, job_id).replace(tag, str(uuid.uuid4())).replace(encoded, encoded_body)


def _rerank_template(app: Celery) -> tuple:
    job, tag, encoded = (uuid.uuid4().hex for _ in range(3))
    message = rerank_message(app, job)
    message["properties"]["delivery_tag"] = tag
    message["body"] = encoded
    return os.getpid(), json_dumps(message), _body_json(job), job, tag, encoded


def _body_json(job_id: str) -> str:
    """The task's args, kwargs and embed (protocol 2) as kombu's registry encodes them for JSON (its own dumps)."""
    return json_dumps(([job_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}))


_templates = threading.local()
_origins: dict[int, str] = {}


def _origin() -> str:
    """Celery's `anon_nodename()` (the host name and process id), worked out once per process."""
    pid = os.getpid()
    origin = _origins.get(pid)
    if origin is None:
        origin = _origins[pid] = anon_nodename()
    return origin


class _Pusher:
    """A publisher connection this process keeps checked out for pushes, with the one push on it whose reply is
    still unread (sent with `wait=False`): its messages and `on_lost`."""

    __slots__ = ("connection", "unread")

    def __init__(self, connection):
        self.connection = connection
        self.unread: tuple[list[str], Callable[[Exception], None] | None] | None = None


def _push(messages: list[str], settings: Settings, *, wait: bool = True,
          on_lost: Callable[[Exception], None] | None = None) -> None:
    """LPUSH of rerank messages' JSON on the queue's list (priority 0 is the bare queue name), as kombu's Redis
    transport does for each; several in one command land in the order given, oldest nearest the consuming end.

    Sent on a connection this process keeps checked out of the publisher's pool (`_idle_pushers`): redis-py's
    command layer (a check-out that polls the socket, the retry wrapper, the check-in) was 40 of a push's
    ~70 µs. A broker error is retried as the publisher's own policy would (PUBLISH_RETRIES, a moment apart).
    The connection's earlier unread reply is settled first, so at most one is ever unread.
    """
    pool = _publisher(settings).connection_pool
    idle = _idle_pushers.setdefault((os.getpid(), settings.celery_broker_url), [])
    try:
        pusher = idle.pop()  # atomic: threads never share one
    except IndexError:
        pusher = _Pusher(pool.get_connection())
    try:
        _settle(pusher)
        _send(pusher.connection, messages, wait=wait)
    except BaseException:
        pusher.connection.disconnect()
        pool.release(pusher.connection)
        raise
    if not wait:
        pusher.unread = (messages, on_lost)
    if len(idle) < KEPT_PUSHERS:
        idle.append(pusher)
    else:
        _settle(pusher)
        pool.release(pusher.connection)


def _send(connection, messages: list[str], *, wait: bool) -> None:
    """Send one LPUSH, and read its reply when `wait`; a lost connection is retried as the publisher's policy says."""
    from redis.exceptions import ConnectionError, TimeoutError

    packed = connection.pack_command("LPUSH", RERANK_QUEUE, *messages)
    for failures in range(PUBLISH_RETRIES + 1):
        try:
            connection.send_packed_command(packed, check_health=False)  # reconnects when disconnected
            if wait:
                connection.read_response()
            return
        except (ConnectionError, TimeoutError):
            connection.disconnect()
            if failures == PUBLISH_RETRIES:
                raise
            time.sleep(PUBLISH_RETRY_SECONDS)


def _settle(pusher: _Pusher) -> None:
    """Read the reply of the pusher's unread push, sending its message again if the connection was lost first;
    then make sure the connection was not closed by the broker meanwhile (a restart), so the next message is
    not written into a dead socket. Never raises: a message that cannot be sent goes to its `on_lost`."""
    from redis.exceptions import RedisError, ResponseError

    connection = pusher.connection
    unread, pusher.unread = pusher.unread, None
    if unread is not None:
        messages, on_lost = unread
        try:
            connection.read_response()
        except ResponseError as exc:  # the broker refused these messages: sending them again would be refused too
            _lost(on_lost, exc)
        except RedisError:  # the connection was lost (or garbled) before the reply came
            connection.disconnect()
            try:
                _send(connection, messages, wait=True)  # perhaps taken before the loss: duplicates are harmless
            except RedisError as exc:
                _lost(on_lost, exc)
    try:
        if connection.can_read(timeout=0):  # nothing is owed to us: data here is a closed or confused connection
            connection.disconnect()
    except RedisError:
        connection.disconnect()  # closed by the broker; the next send reconnects


def settle_pushes(settings: Settings) -> None:
    """Read the unread replies of this process's idle pushers for the settings' broker (`_settle`): for a sender
    that pushed with `wait=False` and has nothing more to send, so a refused or lost push is noticed now."""
    idle = _idle_pushers.get((os.getpid(), settings.celery_broker_url), [])
    for _ in range(len(idle)):
        try:
            pusher = idle.pop()
        except IndexError:
            return
        try:
            if pusher.unread is not None:
                _settle(pusher)
        finally:
            idle.insert(0, pusher)


def _lost(on_lost: Callable[[Exception], None] | None, error: Exception) -> None:
    log.warning("rerank messages the broker did not take: %s", error)
    if on_lost is not None:
        try:
            on_lost(error)
        except Exception:
            log.exception("handling rerank messages the broker did not take failed")


# How far from the consuming end `withdraw_reranks` looks, per job: a batch answers the oldest queued jobs, whose
# messages wait there, a little out of order when several threads or processes submit.
WITHDRAW_SCAN_PER_JOB = 4
# KEYS[1]: the queue's list; ARGV[1]: how many messages from its consuming end (the right) to look at; ARGV[2]: the
# task name; ARGV[3..]: job ids. A message whose task id (the first "id" key: the headers') is one of them is
# removed. Run in the broker, so no message is read out and no consumer can take one half-way.
_WITHDRAW_LUA = """
local wanted = {}
for i = 3, #ARGV do wanted[ARGV[i]] = true end
local removed = 0
for _, message in ipairs(redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)) do
  local id = string.match(message, '"id":%s*"([^"]+)"')
  if id and wanted[id] then
    local ok, decoded = pcall(cjson.decode, message)
    if ok and type(decoded) == 'table' and type(decoded.headers) == 'table'
        and decoded.headers.task == ARGV[2] and decoded.headers.id == id then
      removed = removed + redis.call('LREM', KEYS[1], -1, message)
    end
  end
end
return removed
"""


def withdraw_reranks(job_ids, settings: Settings) -> int:
    """Take the waiting `recsys.rerank` messages of these jobs off the rerank queue; how many were taken.

    For jobs a worker has just finished inside another message's batch: their own messages would each
    only be handed to a pool process and acknowledged (Celery's whole per-message cost, ~3 ms here, for
    nothing), one after another before the next batch can start. Only the messages near the consuming end
    are looked at (`WITHDRAW_SCAN_PER_JOB` per job); one found further back, or taken by a consumer
    first, is still answered as before. Never raises: a broker error is logged and the messages stay.
    Redis brokers only (others: 0).
    """
    ids = [str(job_id) for job_id in job_ids]
    if not ids or not settings.celery_broker_url.startswith(REDIS_SCHEMES):
        return 0
    try:
        client_for_scripts = redis_client(settings)
        script = _kept(_withdraw_scripts, settings, lambda _url: client_for_scripts.register_script(_WITHDRAW_LUA))
        withdrawn = int(script(keys=[RERANK_QUEUE], args=[WITHDRAW_SCAN_PER_JOB * len(ids), RERANK_TASK, *ids]))
    except Exception as exc:
        log.warning("the messages of %d answered jobs stay queued: %s", len(ids), exc)
        return 0
    if withdrawn:
        log.info("took %d waiting messages of answered jobs off the %s queue", withdrawn, RERANK_QUEUE)
    return withdrawn


_withdraw_scripts: dict[tuple[int, str], object] = {}

KEPT_PUSHERS = 4
_idle_pushers: dict[tuple[int, str], list] = {}
_publishers: dict[tuple[int, str], object] = {}
_redis_clients: dict[tuple[int, str], object] = {}


def _publisher(settings: Settings):
    """This process's Redis connection for messages, with Celery's publish timeouts and retries."""
    import redis
    from redis.backoff import ConstantBackoff
    from redis.retry import Retry

    return _kept(_publishers, settings, lambda url: redis.Redis.from_url(
        url, socket_timeout=5, socket_connect_timeout=1,
        retry=Retry(ConstantBackoff(PUBLISH_RETRY_SECONDS), PUBLISH_RETRIES)))


def redis_client(settings: Settings):
    """This process's plain Redis client on the broker, for small shared state (heartbeats, login counters)."""
    import redis

    return _kept(_redis_clients, settings,
                 lambda url: redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1))


def _kept(registry: dict, settings: Settings, make):
    """This process's client in `registry` for the settings' broker, made once by `make(url)`."""
    key = (os.getpid(), settings.celery_broker_url)
    with _lock:
        kept = registry.get(key)
        if kept is None:
            kept = registry[key] = make(settings.celery_broker_url)
        return kept


def reset_clients() -> None:
    """Close this process's broker connections (tests that stop a broker)."""
    with _lock:
        for app in _apps.values():
            app.close()
        _apps.clear()
        for (pid, _url), idle in _idle_pushers.items():
            for pusher in idle if pid == os.getpid() else ():
                pusher.connection.disconnect()  # an unread reply goes with it, as when the process ends
        _idle_pushers.clear()
        for redis in [*_redis_clients.values(), *_publishers.values()]:
            redis.close()
        _redis_clients.clear()
        _publishers.clear()
        _withdraw_scripts.clear()
        _declared.clear()
