"""The floor: flask-sock as its README shows it, broadcasting in a loop.

``for ws in clients: ws.send(text)`` frames the message again for every
client (simple-websocket sends through wsproto, one ``send`` call each).
"""
import json

from flask import Flask
from flask_sock import ConnectionClosed, Sock

from common import add_control_routes

app = Flask(__name__)
sock = Sock(app)
clients = set()


@sock.route("/ws")
def ws_view(ws):
    clients.add(ws)
    try:
        ws.send("ready")
        while True:
            message = json.loads(ws.receive())
            ws.send(json.dumps({"event": "reply", "data": message.get("data")}))
    except ConnectionClosed:
        pass
    finally:
        clients.discard(ws)


def broadcast(data: dict) -> None:
    text = json.dumps({"event": "msg", "data": data})
    for ws in list(clients):
        try:
            ws.send(text)
        except ConnectionClosed:
            clients.discard(ws)


def subscribers() -> int:
    return len(clients)


add_control_routes(app, broadcast, subscribers)
