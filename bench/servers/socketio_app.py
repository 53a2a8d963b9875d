"""Flask-SocketIO 5 on gevent: the alternative Flask users reach for.

Every client joins the room ``bench`` when it connects; a broadcast is one
``socketio.emit`` to that room, as its documentation shows. The Engine.IO
ping interval is raised to an hour so that no keep-alive frames mix into
the measured streams (this project's pings are off in the benchmark too).
"""
from flask import Flask
from flask_socketio import SocketIO, emit, join_room

from common import add_control_routes

app = Flask(__name__)
socketio = SocketIO(app, async_mode="gevent", ping_interval=3600, ping_timeout=600)


@socketio.on("connect")
def on_connect():
    join_room("bench")


@socketio.on("echo")
def echo(data):
    emit("echo", data)


def broadcast(data: dict) -> None:
    socketio.emit("msg", data, to="bench")


def subscribers() -> int:
    return len(socketio.server.manager.rooms.get("/", {}).get("bench", ()))


add_control_routes(app, broadcast, subscribers)
