-- One message, one expected end-of-message verdict. -D globals:
--   expect_reply  continue, discard, replycode, ... (REPLIES in common.lua)
--   quarantined   "yes": an SMFIR_QUARANTINE must come before the verdict
--   smtp_code, smtp_xcode, smtp_text: the whole 'y' reply, checked when given
--   read_timeout  seconds miltertest waits for each reply (default 10)
dofile(helpers)

if read_timeout ~= nil then mt.set_timeout(tonumber(read_timeout)) end
local conn = open_session(nil, nil, nil)
send_message(conn, msgfile, queue_id)
expect(mt.eom(conn) == nil, "eom failed (no reply in time?)")
local want = REPLIES[expect_reply]
expect(want ~= nil, "unknown expect_reply " .. tostring(expect_reply))
expect(mt.getreply(conn) == want, "expected " .. expect_reply .. " ("
       .. tostring(want) .. "), got " .. tostring(mt.getreply(conn)))
if quarantined == "yes" then
  expect(mt.eom_check(conn, MT_QUARANTINE), "no quarantine requested")
else
  expect(not mt.eom_check(conn, MT_QUARANTINE), "quarantine requested")
end
if smtp_code ~= nil then
  expect(mt.eom_check(conn, MT_SMTPREPLY, smtp_code, smtp_xcode, smtp_text),
         "SMTP reply is not " .. smtp_code .. " " .. smtp_xcode .. " " .. smtp_text)
end
mt.disconnect(conn)
