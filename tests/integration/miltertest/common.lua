-- Helpers for the miltertest scripts of tests/integration/test_miltertest.py.
-- Globals set with miltertest -D: sock (the milter's address), msgfile (a whole
-- message file), and per script the expectations described there.

REPLIES = {
  continue = SMFIR_CONTINUE, accept = SMFIR_ACCEPT, discard = SMFIR_DISCARD,
  reject = SMFIR_REJECT, tempfail = SMFIR_TEMPFAIL, replycode = SMFIR_REPLYCODE,
}

-- miltertest exits 1 without printing a script's error: say it first.
function expect(condition, text)
  if not condition then
    mt.echo("FAILED: " .. text)
    error(text)
  end
end

-- A connection, negotiated with what the MTA offers (nil: miltertest's
-- defaults, i.e. version 6 and everything), and the client's details sent.
function open_session(version, actions, steps)
  local conn = mt.connect(sock, 40, 0.25)
  expect(conn ~= nil, "cannot connect to the milter at " .. tostring(sock))
  expect(mt.negotiate(conn, version, actions, steps) == nil, "negotiation failed")
  mt.macro(conn, SMFIC_CONNECT, "j", "mx.example.test", "{daemon_name}", "ORIGINATING")
  expect(mt.conninfo(conn, "client.example.test", "192.0.2.1") == nil, "conninfo failed")
  return conn
end

-- Reply to the last step, when the milter was asked for one.
function expect_continue(conn, step, no_reply_flag)
  if no_reply_flag == nil or not mt.test_option(conn, no_reply_flag) then
    expect(mt.getreply(conn) == SMFIR_CONTINUE, step .. ": expected continue, got "
           .. tostring(mt.getreply(conn)))
  end
end

-- The envelope, then msgfile's header fields one by one (folded lines kept
-- as the MTA sends them), end of header, and its body with CRLF line ends.
function send_message(conn, path, queue_id)
  if not mt.test_option(conn, SMFIP_NOHELO) then
    expect(mt.helo(conn, "helo.example.test") == nil, "helo failed")
    expect_continue(conn, "HELO", SMFIP_NR_HELO)
  end
  mt.macro(conn, SMFIC_MAIL, "i", queue_id or "4MtTest1")
  expect(mt.mailfrom(conn, "<alice@example.test>") == nil, "mailfrom failed")
  expect_continue(conn, "MAIL", SMFIP_NR_MAIL)
  expect(mt.rcptto(conn, "<bob@example.test>") == nil, "rcptto failed")
  expect_continue(conn, "RCPT", SMFIP_NR_RCPT)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a"):gsub("\r\n", "\n")
  f:close()
  local cut = data:find("\n\n", 1, true)
  local head, body = data:sub(1, cut), data:sub(cut + 2)
  local fields = {}
  for line in head:gmatch("([^\n]*)\n") do
    if line:match("^[ \t]") and #fields > 0 then
      fields[#fields].value = fields[#fields].value .. "\n" .. line
    else
      local name, value = line:match("^([^:]+):[ \t]?(.*)$")
      fields[#fields + 1] = { name = name, value = value }
    end
  end
  for _, field in ipairs(fields) do
    expect(mt.header(conn, field.name, field.value) == nil, "header failed")
    expect_continue(conn, "header " .. field.name, SMFIP_NR_HDR)
  end
  expect(mt.eoh(conn) == nil, "eoh failed")
  expect_continue(conn, "EOH", SMFIP_NR_EOH)
  expect(mt.bodystring(conn, (body:gsub("\n", "\r\n"))) == nil, "body failed")
  expect_continue(conn, "body", SMFIP_NR_BODY)
end
