# Writes OUT, a C file defining one NUL-terminated string per Lua module in MODULES:
#   const char luamod_<name>[];  const size_t luamod_<name>_len;
# where <name> is the file name without .lua (dots become underscores).
# MODULES: the paths, separated by '|' (CMakeLists.txt passes the list as one argument)
string(REPLACE "|" ";" MODULES "${MODULES}")
set(body "/* generated from the lua/ modules by scripts/embed-lua.cmake: do not edit */\n#include <stddef.h>\n")
foreach(path ${MODULES})
  get_filename_component(name ${path} NAME_WE)
  string(REPLACE "." "_" name ${name})
  file(READ ${path} hex HEX)
  string(LENGTH "${hex}" hexlen)
  math(EXPR len "${hexlen} / 2")
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
  string(APPEND body "const char luamod_${name}[] = {${bytes}0x00};\nconst size_t luamod_${name}_len = ${len};\n")
endforeach()
file(WRITE ${OUT} "${body}")
