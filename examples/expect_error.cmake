# Runs an example that must refuse its input: exit code 2, an "error: " line on stderr that matches
# EXPECT, and nothing written into OUTPUT.
#   cmake -DPROGRAM=<exe> -DARGS="--flag|value|..." -DEXPECT=<regex> -DOUTPUT=<dir> -P expect_error.cmake
string(REPLACE "|" ";" args "${ARGS}")
file(REMOVE_RECURSE "${OUTPUT}")
execute_process(COMMAND "${PROGRAM}" ${args} RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT code EQUAL 2)
  message(FATAL_ERROR "expected exit code 2, got ${code}\nstdout:\n${out}\nstderr:\n${err}")
endif()
if(NOT err MATCHES "^error: [^\n]*${EXPECT}")
  message(FATAL_ERROR "stderr does not match 'error: ...${EXPECT}':\n${err}")
endif()
if(EXISTS "${OUTPUT}")
  message(FATAL_ERROR "the refused run wrote '${OUTPUT}'")
endif()
message(STATUS "refused as expected: ${err}")
