-- wrk script of the echo256 workload: POST a 256-byte body, the server echoes it back.
-- The body is the same as ECHO_REQUEST in apps/_payloads.py: "0123456789abcdef" x 16.
-- Used as: wrk ... -s benchmark/wrk/echo256.lua http://127.0.0.1:PORT/echo
wrk.method = "POST"
wrk.body = string.rep("0123456789abcdef", 16)
wrk.headers["Content-Type"] = "application/octet-stream"
