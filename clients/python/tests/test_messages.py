"""Control message parsing: typed messages, typed errors for malformed ones."""

import pytest

from tickgate_client import ErrorReply, Gap, ProtocolError, Shutdown, UnknownMessage, Welcome, parse_message


def test_known_messages():
    w = parse_message('{"type":"welcome","protocol":1,"session":"s-1","sub":"demo","exp":5,"heartbeat_ms":15000,'
                      '"feeds":[{"name":"DEMO","id":1,"epoch":9}]}')
    assert isinstance(w, Welcome) and w.feed("DEMO").epoch == 9 and w.feed("X") is None
    g = parse_message('{"type":"gap","feed":"DEMO","symbol":"AAPL","from":3,"to":4,"reason":"source_gap"}')
    assert g == Gap("DEMO", "AAPL", 3, 4, "source_gap")
    assert parse_message('{"type":"error","code":"unknown_feed","message":"no"}') == ErrorReply(None, "unknown_feed", "no")
    assert parse_message('{"type":"shutdown","reconnect_after_ms":1500}') == Shutdown(1500)


def test_v1_1_throttle_messages():
    from tickgate_client import Subscribed, Throttled

    t = parse_message('{"type":"throttled","id":7,"feed":"DEMO","symbols":["AAPL","MSFT"],"max_rate":5}')
    assert t == Throttled(7, "DEMO", ("AAPL", "MSFT"), 5.0, None) and isinstance(t.max_rate, float)
    assert parse_message('{"type":"throttled","id":8,"max_bytes_per_s":65536}') == Throttled(8, max_bytes_per_s=65536)
    both = parse_message('{"type":"throttled","feed":"DEMO","symbols":["AAPL"],"max_rate":0.0,"max_bytes_per_s":0}')
    assert both == Throttled(None, "DEMO", ("AAPL",), 0.0, 0)
    s = parse_message('{"type":"subscribed","id":1,"feed":"DEMO","epoch":3,"instruments":[],"max_rate":20.0}')
    assert isinstance(s, Subscribed) and s.max_rate == 20.0
    assert parse_message('{"type":"subscribed","id":1,"feed":"DEMO","epoch":3,"instruments":[]}').max_rate is None
    g = parse_message('{"type":"gap","feed":"DEMO","symbol":"AAPL","from":3,"to":4,"reason":"throttled"}')
    assert g == Gap("DEMO", "AAPL", 3, 4, "throttled")


def test_unknown_type_is_kept():
    m = parse_message('{"type":"future_thing","x":1}')
    assert isinstance(m, UnknownMessage) and m.type == "future_thing" and m.data["x"] == 1


@pytest.mark.parametrize("text", [
    "not json", "[1,2]", '{"no":"type"}', '{"type":5}', '{"type":"gap","feed":"DEMO"}',
    '{"type":"gap","feed":"DEMO","symbol":"A","from":"3","to":4}', '{"type":"welcome","protocol":1,"feeds":[5]}',
    '{"type":"subscribed","feed":"DEMO","epoch":1,"instruments":[{"symbol":"A","id":true,"seq":1}]}',
    '{"type":"pong","id":"x"}', b"\xff\xfe",
    '{"type":"throttled","id":1,"max_rate":"5"}', '{"type":"throttled","id":1,"max_rate":true}',
    '{"type":"throttled","id":1,"symbols":["A",2]}', '{"type":"throttled","id":1,"max_bytes_per_s":1.5}',
    '{"type":"subscribed","feed":"DEMO","epoch":1,"instruments":[],"max_rate":[]}',
])
def test_malformed_messages_raise_protocol_error(text):
    with pytest.raises(ProtocolError):
        parse_message(text)


def test_close_codes_map_to_typed_exceptions():
    from tickgate_client import ServerShutdown, SlowConsumer, StreamClosed, TokenExpired, TokenRevoked
    from tickgate_client.errors import closed_error

    for code, cls in [(4001, TokenExpired), (4003, TokenRevoked), (4008, SlowConsumer), (1001, ServerShutdown)]:
        e = closed_error(code, "why")
        assert type(e) is cls and isinstance(e, StreamClosed) and (e.code, e.reason) == (code, "why")
    assert closed_error(1001, "", 2500).reconnect_after_ms == 2500
    assert type(closed_error(1008, "heartbeat timeout")) is StreamClosed


def test_backoff_is_jittered_exponential_and_capped():
    from tickgate_client.stream import backoff_delay

    assert backoff_delay(0, 1.0, 10.0, 0.0) == 0.5 and backoff_delay(0, 1.0, 10.0, 1.0) == 1.0
    assert backoff_delay(3, 1.0, 10.0, 1.0) == 8.0
    assert backoff_delay(60, 1.0, 10.0, 0.5) == 7.5
    for attempt in range(10):
        d = backoff_delay(attempt, 0.2, 2.0)
        assert 0.1 * min(2 ** attempt, 10) <= d <= 0.2 * min(2 ** attempt, 10)
