# Fails when a Catch2 test name would not reach ctest whole. catch_discover_tests() keeps the names in
# a CMake list, so a name with ';' becomes two ctest tests whose filters match nothing: both pass
# without running a line. Usage: cmake -DPROGRAM=<test program> -P check_test_names.cmake
execute_process(COMMAND "${PROGRAM}" --list-test-names-only
                OUTPUT_VARIABLE names RESULT_VARIABLE result)
if(result LESS 0 OR names STREQUAL "")
  message(FATAL_ERROR "${PROGRAM} --list-test-names-only failed (${result}) or listed nothing")
endif()
string(REGEX MATCHALL "[^\n]*;[^\n]*" split_names "${names}")
if(split_names)
  string(REPLACE ";" "\\;" shown "${split_names}")
  message(FATAL_ERROR "test names must not contain ';' (ctest would register pieces that run nothing): ${shown}")
endif()
# An unclosed '[' (a name like "... cover [0, n) ...") makes CMake's list handling swallow every name
# after it into one: those tests are never registered, and nothing fails.
string(REGEX MATCHALL "[^\n]*\\[[^]\n]*\n" open_names "${names}\n")
if(open_names)
  message(FATAL_ERROR "test names must close every '[' they open (ctest would lose the tests after them): ${open_names}")
endif()
string(REGEX MATCHALL "\n" lines "${names}")
list(LENGTH lines count)
message(STATUS "${count} test names, none split")
