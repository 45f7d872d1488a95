-- Cases for tests/unit/test_strmatch.c. Returns a list of {subject, pattern, init?}; the test
-- runs each through find, plain find, match, gmatch and gsub (string, table and function
-- replacements, and a max n) in the stock string library and in src/strmatch.c, and
-- compares results and error messages.

local cases = {}
local function add(s, p, init) cases[#cases + 1] = {s, p, init} end

-- Short subjects: every pattern below against each of them stays polynomial.
local subjects = {
  "", "a", "aaa", "ab", "abcabc", "hello world", "  key = value ; x=y  ", "a\0b\0c", "\0",
  "THE (quick) [brown] fox 123!", "f(a(b)c)d((e)", "x=1, y=22, z=333", "h\195\169llo",
  "a.b-c+d*e?f%g", "]]^$[[", "\t\n \r\v", "aaab", "()()", "xyxyx", "^a^a", "a$b$", "==;=",
  "  ", "\255\128\1",
}

local patterns = {
  -- plain text, anchors, '$' and '^' where they are ordinary
  "", "a", "ab", "b", "^a", "a$", "^$", "$", "^", "^^", "$a", "a$b", "^a$", "b$", "%$", "^%^",
  -- single-character classes and repetitions
  ".", "..", "a*", "a+", "a-", "a?", ".-", ".*", ".+", "^.-$", "a**", "a+?", "a-b", ".-b",
  "x*$", "a?b?", ".-.-.-b", "a*a*a", "%a+", "%A+", "%d+", "%D", "%l+", "%L", "%u", "%U+",
  "%s*", "%S+", "%w+", "%W", "%x+", "%X", "%p", "%P+", "%c", "%C", "%g+", "%G", "%z", "%Z",
  "%.", "%%", "%-", "%]", "%*", "%q", "%1x", "%é",
  -- sets
  "[abc]", "[^abc]", "[a-c]+", "[%a_][%w_]*", "[]]", "[^]]", "[a-]", "[-a]", "[%]]", "[%-]",
  "[a%-z]", "[z-a]", "[a-a]", "[%w-]+", "[\0]", "[^\0]+", "[\128-\255]+", "[%s%p]+", "[^%s]+",
  "[.]", "[%.]", "[a-c-e]", "[]-a]", "[^-]", "[%a-z]", "[a-%z]", "[[]", "[[]]",
  -- malformed sets and escapes
  "[]", "[^", "[^]", "[a", "[%", "[%]", "[a%]", "%", "a%", "%%%", "[a]%",
  -- captures
  "(a)", "(a*)", "()", "()a()", "(a)(b)?", "((a)(b))", "(.)(.)(.)", "(h)(e)(l)(l)(o)",
  "(a*(.)%w(%s*))", "()(a)()", "(()a)", "(.-)%s*=%s*(.-)%s*;", "^%s*(.-)%s*$",
  "^%s*(.-)%s*=%s*(.-)%s*;%s*(.-)%s*=%s*(.-)%s*$", "([^=]+)=([^,]*)", "(%w+)", "(x)?",
  -- malformed captures
  "(", ")", "a)", "(()", "(a", "a(", "(a))", "())", ")(",
  -- back-references
  "(a)%1", "(a*)%1", "%1", "(a%1)", "()%1", "%0", "(.)%1", "(.)(.)%2%1", "(a)%2", "%9",
  "(((((((((((a)))))))))))%11", "(.)%1*", "(.-)%1",
  -- %b
  "%b()", "%b", "%b(", "%bxy", "%b\0\0", "%b)(", "%b[]", "%baa", "%b()%b()", "(%b())", "%b()$",
  -- %f
  "%f[%w]%w+", "%f[%W]", "%f[%a]", "%f[%z]", "%f[^\0]", "%f[\0]", "%fa", "%f", "%f[a",
  "%f[%w]", "%f[^%w]", "%f[%s]%s*$", "%f[]", "%f[^]", "%f[a-z]%a", "()%f[%p]()",
}

-- init: none, negative, inside, clamped to 1, at the end (empty tail), past the end; 0 and
-- mininteger (both mean 1) for a third of the subjects.
for k, s in ipairs(subjects) do
  for _, p in ipairs(patterns) do
    add(s, p)
    for _, i in ipairs({-1, 3, -100, #s + 1, #s + 2}) do add(s, p, i) end
    if k % 3 == 0 then add(s, p, 0) end
  end
end

-- Limits: recursion depth, number of captures, init far away.
add(("a"):rep(300), ("a?"):rep(300))
add(("a"):rep(300), (".-"):rep(201))
add(("a"):rep(300), ("a*"):rep(201))
add(("a"):rep(300), ("(a)"):rep(201))
add(("a"):rep(40), ("(a)"):rep(32))
add(("a"):rep(40), ("(a)"):rep(33))
add(("a"):rep(40), ("()"):rep(33))
add(("a"):rep(40), ("()"):rep(32))
add(("a"):rep(40), ("a?"):rep(199))
add(("a"):rep(40), ("a?"):rep(200))
add("abc", "b", math.maxinteger)
add("abc", "b", math.mininteger)
add("abc", "", math.mininteger)
add(("ab"):rep(500), "(a)(b)")
add(("x=1;"):rep(100), "(%w+)=(%w+)")
-- plain find: candidates that fail late, enough of them to hand over to memmem
add(("a"):rep(100) .. "b", ("a"):rep(10) .. "b")
add(("a"):rep(100) .. "b" .. ("a"):rep(20), ("a"):rep(10) .. "b", 50)
add(("ab"):rep(60) .. "ac", "abac")
add(("ab"):rep(60) .. "abac" .. ("ab"):rep(60), "abac", -20)
add(("a\0"):rep(60), "\0a\0a\0")
-- gmatch and gsub after a non-empty match: no empty match at its end (5.4)
add("abc", "%w*")
add("a,b,,c", "[^,]*")
add("hello world from Lua", "%a*")
add(";;a;", ";*")
return cases
