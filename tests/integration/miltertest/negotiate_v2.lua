-- An MTA that offers only version 2 (actions 0x3f, steps 0x7f): every event
-- gets a reply, the header is still added.
dofile(helpers)

local conn = open_session(2, 0x3f, 0x7f)
expect(mt.getreply(conn) == SMFIR_CONTINUE, "CONNECT: expected continue")
for _, option in ipairs({ SMFIP_NR_HDR, SMFIP_NR_BODY, SMFIP_HDR_LEADSPC, SMFIP_NODATA }) do
  expect(not mt.test_option(conn, option), "a version-6 option with a version-2 MTA")
end
expect(mt.test_action(conn, SMFIF_ADDHDRS), "ADDHDRS not requested")
send_message(conn, msgfile)
expect(mt.eom(conn) == nil, "eom failed")
expect(mt.getreply(conn) == SMFIR_CONTINUE, "clean mail: expected continue")
local value = mt.getheader(conn, "X-Virus-Scanned", 0)
expect(value ~= nil and value:match("^by amavisd "), "X-Virus-Scanned: [" .. tostring(value) .. "]")
mt.disconnect(conn)
