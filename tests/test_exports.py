"""The public surface: what users import from the package."""
import flask_robe_sockets


def test_all_names_are_exported():
    """Every name in __all__ exists, and nothing public is missing from it."""
    for name in flask_robe_sockets.__all__:
        assert hasattr(flask_robe_sockets, name), name
    public = {
        name
        for name, value in vars(flask_robe_sockets).items()
        if not name.startswith("_") and isinstance(value, type)
    }
    assert public <= set(flask_robe_sockets.__all__)


def test_errors_share_one_base():
    """Every error class derives from RobeSocketsError, so one except catches all."""
    base = flask_robe_sockets.RobeSocketsError
    for name in flask_robe_sockets.__all__:
        value = getattr(flask_robe_sockets, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, base), name


def test_publish_error_is_the_old_name_of_backend_unavailable():
    """Code written against PublishError still catches what the backend raises."""
    assert flask_robe_sockets.PublishError is flask_robe_sockets.BackendUnavailable
    from flask_robe_sockets.errors import PublishError

    assert PublishError is flask_robe_sockets.BackendUnavailable
