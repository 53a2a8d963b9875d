"""The app's extension objects, made before any app exists (the Flask
factory pattern): modules that register on them or send through them import
them from here, so none has to import another for it."""
from flask_robe_sockets import RobeSockets

sockets = RobeSockets()
