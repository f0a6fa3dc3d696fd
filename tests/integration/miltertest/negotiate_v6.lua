-- Version 6, as Postfix 3.7 and Sendmail 8.17 offer it: our subset of actions,
-- no replies asked for before the end, the X-Virus-Scanned header inserted at
-- the top with one space after the colon (LEADSPC: we send it ourselves), and
-- again on an MTA without LEADSPC (then the MTA adds the space).
dofile(helpers)

local conn = open_session(nil, nil, nil)
for _, action in ipairs({ SMFIF_ADDHDRS, SMFIF_CHGHDRS, SMFIF_QUARANTINE }) do
  expect(mt.test_action(conn, action), "action " .. action .. " not requested")
end
expect(not mt.test_action(conn, SMFIF_CHGBODY), "CHGBODY requested: we never change a body")
for _, option in ipairs({ SMFIP_NR_HDR, SMFIP_NR_BODY, SMFIP_NR_RCPT, SMFIP_NR_MAIL,
                          SMFIP_NODATA, SMFIP_NOUNKNOWN, SMFIP_HDR_LEADSPC }) do
  expect(mt.test_option(conn, option), "protocol option " .. option .. " not requested")
end
expect(not mt.test_option(conn, SMFIP_NOBODY), "body events switched off")
send_message(conn, msgfile)
expect(mt.eom(conn) == nil, "eom failed")
expect(mt.getreply(conn) == SMFIR_CONTINUE, "clean mail: expected continue, got "
       .. tostring(mt.getreply(conn)))
expect(mt.eom_check(conn, MT_HDRINSERT, "X-Virus-Scanned"), "no X-Virus-Scanned inserted")
local value = mt.getheader(conn, "X-Virus-Scanned", 0)
expect(value ~= nil and value:match("^ by amavisd [%d.]+ at scanner%.example%.test$"),
       "X-Virus-Scanned value with LEADSPC: [" .. tostring(value) .. "]")
mt.disconnect(conn)

-- an MTA that offers everything of version 6 but LEADSPC
conn = open_session(6, 0x1ff, 0x0fffff)  -- miltertest needs all three to use them
expect(not mt.test_option(conn, SMFIP_HDR_LEADSPC), "LEADSPC requested but not offered")
send_message(conn, msgfile)
expect(mt.eom(conn) == nil, "eom failed")
expect(mt.getreply(conn) == SMFIR_CONTINUE, "second message: expected continue")
value = mt.getheader(conn, "X-Virus-Scanned", 0)
expect(value ~= nil and value:match("^by amavisd "), "value without LEADSPC: ["
       .. tostring(value) .. "]")
mt.disconnect(conn)
