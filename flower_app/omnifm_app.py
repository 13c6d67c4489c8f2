"""The Flower components of this app: omnifm's ServerApp and ClientApp (omnifm.fl.flower)."""
from omnifm.fl.flower import make_client_app, make_server_app

server_app = make_server_app()
client_app = make_client_app()
